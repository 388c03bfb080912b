"""Issue 16, items 4, 7, 8: the divergence guard (roll back, halve the lr, or stop with
exit 2), the lr warm-up, AUROC at T = 1 beside the deployed T, and p(unknown) in the
report, each checked against an independent computation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from moonprune.cli.app import app
from typer.testing import CliRunner

import moonprune
from moonprune.config import MoonConfig, TrainConfig
from moonprune.errors import ConfigError
from moonprune.training import Trainer

runner = CliRunner()


def _trainer(splits, **train: object) -> Trainer:
    torch.manual_seed(0)
    model = moonprune.models.demo_cnn(num_classes=6, width=4)
    moonprune.add_unknown_output_(model, splits.train.x[:2])
    masker = moonprune.MASKERS.create("rigl", moonprune.MaskerConfig(sparsity=0.8))
    return Trainer(model, masker, splits.train, TrainConfig(**train),  # type: ignore[arg-type]
                   MoonConfig(warmup_epochs=1, average_epochs=1))  # fmt: skip


def test_a_nan_epoch_is_rolled_back_at_half_the_lr(digits06, monkeypatch) -> None:
    trainer = _trainer(digits06, epochs=4)
    original = Trainer._loss
    fired = []

    def poisoned(self, logits, y, epoch, n_global):  # type: ignore[no-untyped-def]
        loss, row_sum = original(self, logits, y, epoch, n_global)
        if epoch == 2 and not fired:
            fired.append(True)
            return loss * math.nan, row_sum
        return loss, row_sum

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    result = trainer.run()
    assert [h.epoch for h in result.history] == [0, 1, 2, 3]  # epoch 2 rerun, kept once
    assert len(result.rollbacks) == 1
    rollback = result.rollbacks[0]
    assert rollback.epoch == 2 and rollback.lr_scale_after == 0.5
    assert "nan" in rollback.reason
    # the rerun trained at half the lr the schedule gives
    lr_epoch3 = result.history[3].lr
    expected = 0.5 * trainer.cfg.lr * trainer._lr_shape(3, trainer.steps_per_epoch - 1)
    assert lr_epoch3 == pytest.approx(expected)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # the rollback survives a save/load of the training state
    state = trainer.state_dict()
    assert state["lr_scale"] == 0.5 and state["rollbacks"][0]["epoch"] == 2


def test_an_epoch_far_above_the_first_is_rolled_back(digits06, monkeypatch) -> None:
    trainer = _trainer(digits06, epochs=3, max_rollbacks=1)
    original = Trainer._run_epoch

    def spiking(self, epoch):  # type: ignore[no-untyped-def]
        original(self, epoch)
        if epoch == 1 and not self.rollbacks:  # report a loss 10x the first epoch's
            last = self.history[-1]
            self.history[-1] = type(last)(**{**vars(last), "loss": 10 * self.history[0].loss})

    monkeypatch.setattr(Trainer, "_run_epoch", spiking)
    result = trainer.run()
    assert len(result.rollbacks) == 1 and "over 3x the first epoch's" in result.rollbacks[0].reason


def test_a_healthy_rise_from_a_tiny_loss_is_not_divergence(digits06, monkeypatch) -> None:
    """0.02 -> 0.07 (a pretrained model as sparsity ramps up) is over 3x, but far below
    chance level: no rollback (this stopped a benchmark run before the chance test)."""
    trainer = _trainer(digits06, epochs=3)
    original = Trainer._run_epoch

    def tiny(self, epoch):  # type: ignore[no-untyped-def]
        original(self, epoch)
        last = self.history[-1]
        self.history[-1] = type(last)(**{**vars(last), "loss": 0.02 if epoch == 0 else 0.07})

    monkeypatch.setattr(Trainer, "_run_epoch", tiny)
    assert trainer.run().rollbacks == []


def test_absurd_lr_stops_with_exit_2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(moonprune.models.demo_cnn(num_classes=3, width=4).state_dict(), tmp_path / "d.pt")
    result = runner.invoke(app, [
        "compress", str(tmp_path / "d.pt"), "--arch", "moonprune.models:demo_cnn",
        "--arch-kwargs", '{"width": 4}', "--data", "digits:0-2", "--out", str(tmp_path / "o"),
        "--epochs", "3", "--lr", "1e6", "--no-export",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "--lr" in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_guard_gives_up_after_max_rollbacks(digits06) -> None:
    trainer = _trainer(digits06, epochs=2, lr=1e6, max_rollbacks=2)
    with pytest.raises(ConfigError, match="after 2 rollback"):
        trainer.run()


def test_lr_warm_up_ramps_linearly_over_the_first_epoch(digits06) -> None:
    trainer = _trainer(digits06, epochs=4, lr_warmup_epochs=1.0)
    n = trainer.steps_per_epoch
    cosine = moonprune.training.lr_factor
    for step in (0, n // 2, n - 1):
        t = step / n
        assert trainer._lr_shape(0, step) == pytest.approx(
            cosine(t, trainer.cfg, trainer.main_epochs) * (step + 1) / n
        )
    assert trainer._lr_shape(1, 0) == pytest.approx(cosine(1.0, trainer.cfg, trainer.main_epochs))


@pytest.fixture(scope="module")
def msp_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A short compress deploying MSP at a fitted temperature (so T = 1 differs)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("t1")
    from moonprune.demo import train_dense

    dense = train_dense(
        moonprune.models.demo_cnn(num_classes=6, width=8),
        moonprune.load_splits("digits:0-5", seed=0), epochs=5,
    )  # fmt: skip
    torch.save(dense.state_dict(), root / "d.pt")
    return moonprune.compress(moonprune.build_config({
        "checkpoint": str(root / "d.pt"), "arch": "moonprune.models:demo_cnn",
        "arch_kwargs": {"width": 8}, "data": "digits:0-5", "ood": ["digits:6-9", "noise"],
        "out": str(root / "run"), "export": False, "score": "msp", "train": {"epochs": 3},
        "moon": {"warmup_epochs": 1},
    }))  # fmt: skip


def test_report_has_auroc_at_t1_and_p_unknown(msp_run) -> None:
    """Recomputed from the saved checkpoint on the same split, independently."""
    from sklearn.metrics import roc_auc_score

    report = msp_run.report
    ckpt = moonprune.load_checkpoint(msp_run.out / "model.pt")
    splits = moonprune.load_splits(
        report.config["data"], seed=report.config["train"]["seed"],
        preprocessing=ckpt.preprocessing,
    )  # fmt: skip
    k = ckpt.num_known
    with torch.no_grad():
        test = ckpt.model(splits.test.x).double()
        ood = {n: ckpt.model(moonprune.load_ood(n, splits.preprocessing, seed=0).x).double()
               for n in report.auroc_t1["compressed"]}  # fmt: skip
    for name, logits in ood.items():
        id_score = torch.softmax(test, -1)[:, :k].amax(-1)
        ood_score = torch.softmax(logits, -1)[:, :k].amax(-1)
        labels = [1] * len(id_score) + [0] * len(ood_score)
        expected = roc_auc_score(labels, torch.cat([id_score, ood_score]).numpy())
        assert report.auroc_t1["compressed"][name] == pytest.approx(expected, abs=1e-9)
    t = report.temperature
    p_u = report.models["compressed"]["p_unknown"]
    assert set(p_u) == {"id_test", *ood}
    assert p_u["id_test"]["mean"] == pytest.approx(
        float(torch.softmax(test / t, -1)[:, k].mean()), abs=1e-9
    )
    html = (msp_run.out / "report.html").read_text()
    assert "compressed: p(unknown) per set" in html and "AUROC % at T = 1" in html
