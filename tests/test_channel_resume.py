"""Channel runs resume (issue 21): an interrupted ``--method channel`` run continues to
bit-identical final weights, never times candidates twice, and refuses other settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from moonprune.cli.app import app
from torch import nn
from typer.testing import CliRunner

from moonprune import models
from moonprune.config import CompressConfig, build_config
from moonprune.data import Splits
from moonprune.errors import ConfigError
from moonprune.heads import add_unknown_output_
from moonprune.sparsity.channel.training import train_channel_pruned
from moonprune.training import StopTraining, TrainResult

pytest.importorskip("torch_pruning")
runner = CliRunner()
#: 4 epochs in 2 stages of 2: the second pruning step comes before epoch 2
SPARSITY = {"method": "channel", "macs_target": 0.5, "steps": 2}


def _config(**sparsity: Any) -> CompressConfig:
    return build_config({"checkpoint": "", "data": "digits:0-5", "out": "unused",
                         "train": {"epochs": 4}, "moon": {"warmup_epochs": 1},
                         "sparsity": {**SPARSITY, **sparsity}})  # fmt: skip


def _fresh(splits: Splits) -> tuple[nn.Module, str]:
    """The same dense demo CNN with its unknown output, every time."""
    torch.manual_seed(0)
    model = models.demo_cnn(num_classes=6, width=8)
    return model, add_unknown_output_(model, splits.train.x[:2])


def _run(splits: Splits, cfg: CompressConfig, state: Path | None = None, **kw: Any) -> TrainResult:
    model, head = _fresh(splits)
    return train_channel_pruned(model, splits.train, head, cfg, state_path=state, **kw)[0]


class _CountingTimer:
    """The modelled timer (tests/fake_timer.py), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, dict[int, float]]:
        from fake_timer import modelled_speedups

        self.calls += 1
        return modelled_speedups(*args, **kwargs)


@pytest.mark.parametrize(
    ("allocation", "steps", "stop_after", "stage"),
    [("latency", 2, 1, 0), ("latency", 2, 2, 1), ("uniform", 3, 1, 1), ("global", 3, 1, 1)],
)
def test_channel_resume_gives_identical_final_weights(
    digits06: Splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allocation: str,
    steps: int, stop_after: int, stage: int,
) -> None:  # fmt: skip
    # 2 steps (stages of 2 + 2 epochs), stopped after epoch 1: the state is the end of
    # stage 0 and the resumed run prunes step 2; after epoch 2: mid stage 1, pruned twice
    # already (the fresh model is re-shaped). 3 steps (1 + 1 + 2 epochs), stopped after
    # epoch 1: the end of stage 1, and the resumed run prunes step 3.
    cfg = _config(allocation=allocation, steps=steps)
    full = _run(digits06, cfg)
    timer = _CountingTimer()
    monkeypatch.setattr("moonprune.speed.time_speedups", timer)
    state = tmp_path / "train-state.pt"
    with pytest.raises(StopTraining):
        _run(digits06, cfg, state, stop_after_epoch=stop_after)
    assert state.is_file()
    saved = torch.load(state, weights_only=True)
    assert saved["channel"]["stage"] == stage
    assert saved["channel"]["pruner"]["done"] == stage + 1
    timed = timer.calls
    assert timed == (1 if allocation == "latency" else 0)
    resumed = _run(digits06, cfg, state, resume=True)
    assert timer.calls == timed  # the plan comes from the state: nothing timed again
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h.epoch for h in resumed.history] == [0, 1, 2, 3]
    assert [h.loss for h in resumed.history] == [h.loss for h in full.history]


def test_channel_resume_with_other_settings_is_refused(digits06: Splits, tmp_path: Path) -> None:
    state = tmp_path / "train-state.pt"
    with pytest.raises(StopTraining):
        _run(digits06, _config(allocation="global"), state, stop_after_epoch=2)
    with pytest.raises(ConfigError) as info:
        _run(digits06, _config(allocation="global", macs_target=0.6), state, resume=True)
    message = str(info.value)
    assert "\n" not in message
    assert "written with other settings (sparsity.macs_target was 0.5, now 0.6)" in message
    # a masker run's state is not a channel run's
    saved = torch.load(state, weights_only=True)
    del saved["channel"]
    torch.save(saved, state)
    with pytest.raises(ConfigError, match="was not written by a --method channel run"):
        _run(digits06, _config(allocation="global"), state, resume=True)
    with pytest.raises(ConfigError, match="there is no training state"):
        _run(digits06, _config(allocation="global"), tmp_path / "none.pt", resume=True)


class _StopAt:
    """A progress callback that interrupts during epoch ``epoch`` (as Ctrl-C would: the
    state on disk is the previous epoch's)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_step(self, info: Any) -> None:
        del info

    def on_epoch_end(self, info: Any) -> None:
        if info.epoch == self.epoch:
            raise StopTraining(f"stopped in epoch {info.epoch}")


def test_compress_channel_resumes_through_the_cli(dense_path: Path, tmp_path: Path) -> None:
    from moonprune.checkpoints import load_checkpoint
    from moonprune.pipeline import compress

    base = {
        "checkpoint": str(dense_path), "arch": "moonprune.models:demo_cnn",
        "arch_kwargs": {"width": 8}, "data": "digits:0-5", "ood": ["noise"], "export": False,
        "train": {"epochs": 4}, "moon": {"warmup_epochs": 1}, "sparsity": SPARSITY,
    }  # fmt: skip
    full = compress(build_config({**base, "out": str(tmp_path / "full")}))
    out = tmp_path / "resumed"
    with pytest.raises(StopTraining):  # in epoch 3: the state holds epoch 2, after step 2
        compress(build_config({**base, "out": str(out)}), callback=_StopAt(3))
    assert not out.exists() and (tmp_path / ".resumed.partial" / "train-state.pt").is_file()
    args = ["compress", str(dense_path), "--arch", "moonprune.models:demo_cnn", "--arch-kwargs",
            '{"width": 8}', "--data", "digits:0-5", "--ood", "noise", "--method", "channel",
            "--prune-steps", "2", "--epochs", "4", "--no-export", "--out", str(out),
            "--resume", "--config", str(_warmup1(tmp_path))]  # fmt: skip
    refused = runner.invoke(app, [*args, "--macs-target", "0.6"])
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused.output, refused.output
    assert "sparsity.macs_target was 0.5 in the interrupted run and is 0.6 now" in lines[0]
    resumed = runner.invoke(app, [*args, "--macs-target", "0.5"])
    assert resumed.exit_code == 0, resumed.output
    a = load_checkpoint(full.out / "model.pt").model.state_dict()
    b = load_checkpoint(out / "model.pt").model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    report = json.loads((out / "report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2, 3]
    assert report["structure"]["macs_fraction"] == full.report.structure["macs_fraction"]


def _warmup1(tmp_path: Path) -> Path:
    path = tmp_path / "w1.toml"
    path.write_text("[moon]\nwarmup_epochs = 1\n")
    return path
