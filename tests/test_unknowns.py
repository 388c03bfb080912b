"""Synthesized unknowns (issue 18): generators, the loss hook, ``none``, resume, report."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from moonprune.config import MoonConfig, TrainConfig
from moonprune.errors import ConfigError
from moonprune.heads import add_unknown_output_
from moonprune.models import demo_cnn
from moonprune.reporting import unknowns_summary
from moonprune.sparsity import MASKERS, MaskerConfig
from moonprune.training import StopTraining, Trainer
from moonprune.unknowns import UNKNOWNS, epoch_generator, rows_for, shares

NAMES = UNKNOWNS.names()


def _inputs(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.rand(12, 3, 7, 9, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x if UNKNOWNS.get(name).space == "input" else x.flatten(1)[:, :20]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generators_are_seeded_finite_and_keep_shape_and_dtype(name: str, dtype) -> None:
    x, y = _inputs(name, dtype), torch.arange(12) % 3
    fn = UNKNOWNS.get(name).fn
    a = fn(x, y, 5, torch.Generator().manual_seed(7))
    b = fn(x, y, 5, torch.Generator().manual_seed(7))
    c = fn(x, y, 5, torch.Generator().manual_seed(8))
    assert a.shape == (5, *x.shape[1:]) and a.dtype == dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(torch.isfinite(a).all())
    assert not any(torch.equal(row, orig) for row in a for orig in x)  # really new rows


@pytest.mark.parametrize("name", NAMES)
def test_generators_survive_degenerate_batches(name: str) -> None:
    """One row, one class, constant values: still finite rows of the right shape."""
    for x, y in ((_inputs(name)[:1], torch.zeros(1, dtype=torch.long)),
                 (torch.zeros_like(_inputs(name)), torch.zeros(12, dtype=torch.long))):  # fmt: skip
        out = UNKNOWNS.get(name).fn(x, y, 4, torch.Generator().manual_seed(0))
        assert out.shape == (4, *x.shape[1:]) and bool(torch.isfinite(out).all())


def test_patch_shuffle_keeps_the_pixels_and_mixup_mixes_other_classes() -> None:
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = UNKNOWNS.get("patch4").fn(x, torch.tensor([0, 1]), 6, torch.Generator().manual_seed(0))
    for row in out:  # a permutation of one source image's pixels
        assert any(torch.equal(row.flatten().sort().values, s.flatten()) for s in x)
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    mixed = UNKNOWNS.get("mixup").fn(x, torch.tensor([0, 1]), 8, torch.Generator().manual_seed(0))
    assert bool(((mixed > 0.3) & (mixed < 0.7)).all())  # always two different classes


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (6, 3, 32, 32), (6, 2, 5, 9), (6, 1, 2, 2)])
def test_blur_equals_reflect_padding_and_a_separable_gaussian(shape: tuple[int, ...]) -> None:
    """The matrix form against the formula written out: reflect-pad, then a Gaussian
    of sigma = side / 6 along the width and then the height."""
    import torch.nn.functional as F

    from moonprune.unknown_generators import blur

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(len(x), dtype=torch.long)
    got = blur(x, y, 4, torch.Generator().manual_seed(5))
    rows = x[torch.randint(len(x), (4,), generator=torch.Generator().manual_seed(5))]
    h, w = shape[-2:]
    radius = max(1, min(h, w) // 2 - 1 if min(h, w) > 2 else 1)
    pad = min(radius, h - 1, w - 1)
    t = torch.arange(-pad, pad + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / (max(h, w) / 6)) ** 2)
    k = (k / k.sum()).float()
    c = shape[1]
    out = F.pad(rows, (pad,) * 4, mode="reflect")
    out = F.conv2d(out, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    want = F.conv2d(out, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, rows, atol=1e-3)  # it did blur


def test_vos_points_lie_beyond_every_batch_row() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 8, generator=g) + 5 * (torch.arange(64) % 2)[:, None]
    y = torch.arange(64) % 2
    out = UNKNOWNS.get("vos").fn(f, y, 32, torch.Generator().manual_seed(1))
    means = torch.stack([f[y == c].mean(0) for c in (0, 1)])
    d_rows = (f - means[y]).norm(dim=1).max()
    d_out = torch.cdist(out, means).min(dim=1).values
    assert bool((d_out > d_rows).all())


def test_resolve_and_validation() -> None:
    assert UNKNOWNS.resolve("none") == ()
    assert UNKNOWNS.resolve("synth") and UNKNOWNS.resolve("patch2+vos") == ("patch2", "vos")
    with pytest.raises(ConfigError, match="did you mean 'patch4'"):
        MoonConfig(unknowns="patch5")
    with pytest.raises(ConfigError, match="unknowns_fraction"):
        MoonConfig(unknowns="synth", unknowns_fraction=0.0)
    with pytest.raises(ConfigError, match="unknowns_weight"):
        MoonConfig(unknowns="synth", unknowns_weight=-1.0)
    with pytest.raises(ConfigError, match="unknown_head must be mean or separate"):
        MoonConfig(unknown_head="median")
    assert MoonConfig(unknowns="synth").unknown_head == "mean"  # the paper's head by default
    assert shares(7, 3) == [3, 2, 2] and rows_for(64, 0.25) == 16
    assert not torch.equal(
        torch.rand(3, generator=epoch_generator(0, 1, 0)),
        torch.rand(3, generator=epoch_generator(0, 1, 1)),
    )  # each rank draws its own rows


def _model(digits06) -> torch.nn.Module:
    torch.manual_seed(0)
    model = demo_cnn(num_classes=6, width=4)
    add_unknown_output_(model, digits06.train.x[:2])
    return model


def _trainer(model, digits06, moon: MoonConfig, train=None, state_path=None) -> Trainer:
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, update_interval=3, seed=1))
    train = train or TrainConfig(epochs=2, batch_size=64, seed=3)
    return Trainer(model, masker, digits06.train, train, moon, state_path=state_path)


@pytest.mark.parametrize("name", ["patch4", "vos"])
def test_synthesized_rows_reach_the_unknown_column(digits06, name: str) -> None:
    """The extra loss is weight * mean CE(rows, K): its gradient raises the unknown logit
    (negative gradient on the unknown bias) and the loss scales with the weight."""
    x, y = digits06.train.x[:64], digits06.train.y[:64]
    losses = []
    for weight in (0.5, 1.0):
        trainer = _trainer(_model(digits06), digits06, MoonConfig(unknowns=name,
                           unknowns_weight=weight))  # fmt: skip
        logits, extra = trainer._forward_with_unknowns(x, y, 64, torch.Generator().manual_seed(0))
        assert logits.shape == (64, 7)
        extra.backward()
        head = trainer.model.classifier
        assert head.bias.grad is not None and float(head.bias.grad[6]) < 0
        assert float(head.bias.grad[:6].sum()) > 0  # known logits pushed down on them
        losses.append(float(extra.detach()))
    assert losses[1] == pytest.approx(2 * losses[0], rel=1e-5)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


#: Final weights of the run below with the code before issue 18 (commit bece627),
#: torch 2.13.0+cpu; ``none`` must reproduce them bit for bit. Re-recorded when the
#: average's BatchNorm recalibration became row-weighted as the reference's bn_update,
#: and again when it read the rows shuffled (after 7e1aa53): only the running statistics
#: changed (parameters still bece627's).
NONE_DIGEST = "22dd3888bb6e8f13a07dea355a29469d9fa11b0bd4006555b63e1fddd2a90d87"


@pytest.mark.skipif(torch.__version__ != "2.13.0+cpu", reason="digest recorded on torch 2.13 CPU")
def test_none_is_bit_identical_to_the_code_before_unknowns(monkeypatch) -> None:
    from moonprune.data import load_splits

    def untouched(*_args, **_kwargs):  # the synthesizing path must not even run
        raise AssertionError("--unknowns none entered the synthesizing path")

    monkeypatch.setattr(Trainer, "_forward_with_unknowns", untouched)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = load_splits("digits:0-5", seed=0)
        torch.manual_seed(0)
        model = demo_cnn(num_classes=6, width=4)
        add_unknown_output_(model, splits.train.x[:2])
        masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, update_interval=3, seed=1))
        moon = MoonConfig(warmup_epochs=1, average_epochs=1)
        assert moon.unknowns == "none"
        result = Trainer(model, masker, splits.train, TrainConfig(epochs=2, seed=3), moon).run()
    finally:
        torch.set_num_threads(threads)
    assert _digest(result.model) == NONE_DIGEST


def test_synth_changes_training_and_resume_is_bit_identical(digits06, tmp_path: Path) -> None:
    moon = MoonConfig(warmup_epochs=1, average_epochs=1, average_fraction=0.3,
                      unknowns="patch2+vos")  # fmt: skip
    train = TrainConfig(epochs=3, batch_size=64, seed=3)
    base = _model(digits06)
    full = _trainer(copy.deepcopy(base), digits06, moon, train).run()
    plain_moon = _trainer(copy.deepcopy(base), digits06, MoonConfig(warmup_epochs=1,
                          average_epochs=1, average_fraction=0.3), train).run()  # fmt: skip
    assert _digest(full.model) != _digest(plain_moon.model)
    assert all(h.unknown_rate is not None for h in full.history)

    state = tmp_path / "state.pt"
    first = _trainer(copy.deepcopy(base), digits06, moon, train, state)
    with pytest.raises(StopTraining):
        first.run(stop_after_epoch=0)
    second = _trainer(_model(digits06), digits06, moon, train, state)
    second.load_state(state)
    resumed = second.run()
    assert _digest(resumed.model) == _digest(full.model)
    assert [h.unknown_rate for h in resumed.history] == [h.unknown_rate for h in full.history]


def test_plain_baseline_ignores_unknowns(digits06) -> None:
    """Without MOON there is no unknown column: the setting is recorded as none."""
    torch.manual_seed(0)
    model = demo_cnn(num_classes=6, width=4)
    moon = MoonConfig(enabled=False, unknowns="vos")
    trainer = _trainer(model, digits06, moon, TrainConfig(epochs=1, seed=3))
    assert trainer.unknowns == ()
    record, synth = unknowns_summary(trainer.run().model, digits06.val, moon, 0)
    assert record.setting == "none" and not record.beyond_paper and synth == {}


def test_report_records_the_unknowns_and_the_guard(digits06) -> None:
    model = _model(digits06)
    with torch.no_grad():  # every row's argmax becomes "unknown": the guard must fire
        model.classifier.bias[6] = 100.0
    moon = MoonConfig(unknowns="patch4+vos", unknowns_fraction=0.5)
    record, synth = unknowns_summary(model, digits06.val, moon, 0)
    assert record.generators == ["patch4", "vos"] and record.beyond_paper
    assert record.fraction == 0.5 and record.val_unknown_rate == 1.0
    assert record.warnings and "validation rows" in record.warnings[0]
    assert set(synth) == {"synth: patch4", "synth: vos"}
    assert all(len(v) == len(digits06.val) for v in synth.values())
