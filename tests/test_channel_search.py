"""The latency table, the latency allocation and the checks made before training.

Timing is replaced by a deterministic model of a blocked CPU kernel (cost grows with
``ceil(channels / 16)``), so these tests check the logic, never this machine's speed;
the measured speed-ups are in benchmarks/structured.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moonprune import models
from moonprune.channel_training import channel_target, resolved_steps
from moonprune.config import DEFAULT_CHANNEL_SPEEDUP, build_config
from moonprune.errors import ConfigError
from moonprune.heads import add_unknown_output_
from moonprune.latency import LatencyTable, LayerShape

pytest.importorskip("torch_pruning")
BLOCK = 16


def blocked_ms(shape: LayerShape | None) -> float:
    """A fake operator latency: whole blocks of 16 channels, like onnxruntime's NCHWc."""
    if shape is None:
        return 0.001
    blocks = math.ceil(shape.c_in / BLOCK) * math.ceil(shape.c_out / BLOCK)
    return 0.001 + 0.01 * blocks * math.prod(shape.kernel or (1,)) * math.prod(
        shape.spatial or (1,)
    )


@pytest.fixture
def fake_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Table entries from :func:`blocked_ms`; whole networks 'measured' as ``measured``."""
    monkeypatch.setenv("MOONPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    measured = {"speedup": 1.6}

    def fake_measure(self: LatencyTable, shape: LayerShape | None) -> float:
        self.measured += 1
        self._dirty = True
        return blocked_ms(shape)

    monkeypatch.setattr(LatencyTable, "_measure", fake_measure)
    monkeypatch.setattr("moonprune.channel_latency.dense_latency", lambda *a: 10.0)
    monkeypatch.setattr(
        "moonprune.speed.speedups",
        lambda dense, pruned, example, batches, threads: dict.fromkeys(
            batches, measured["speedup"]
        ),
    )
    return measured


def _resnet(width: int = 32) -> tuple[torch.nn.Module, torch.Tensor, str]:
    torch.manual_seed(0)
    model = models.resnet8(num_classes=5, in_channels=3, width=width).eval()
    x = torch.randn(4, 3, 16, 16)
    return model, x, add_unknown_output_(model, x)


def test_table_is_measured_once_and_cached(tmp_path: Path, fake_timing: dict) -> None:
    shape = LayerShape("conv", 16, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    table = LatencyTable(64, 2, cache=tmp_path)
    first = table(shape)
    assert first == pytest.approx(blocked_ms(shape) - blocked_ms(None))
    assert table.measured == 4  # the entry, and the empty graph (best of three)
    table.save()
    again = LatencyTable(64, 2, cache=tmp_path)
    assert again(shape) == first and again.measured == 0
    assert LatencyTable(1, 2, cache=tmp_path).entries == {}  # another batch, another file
    table.path.write_text("{not json")
    assert LatencyTable(64, 2, cache=tmp_path).entries == {}  # damaged: measured again


def test_latency_allocation_keeps_widths_on_the_block_grid(fake_timing: dict) -> None:
    from moonprune.structured import ChannelPruner

    model, x, head = _resnet(width=32)
    pruner = ChannelPruner(model, x, head, keep=0.5, measure="macs", steps=2, round_to=16)
    for _ in range(2):
        stats = pruner.step()
    assert stats["macs_fraction"] <= 0.5 + 1e-6
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 16 == 0 for w in widths), widths
    report = pruner.latency_report()
    assert report is not None and report["planned_measured_speedup"] == {"1": 1.6, "64": 1.6}
    assert report["predicted_speedup"]["64"] > 1


def test_speedup_target_reached_by_the_prediction(fake_timing: dict) -> None:
    from moonprune.structured import ChannelPruner

    model, x, head = _resnet(width=32)
    fake_timing["speedup"] = 1.5  # what the plan measures: the target, so no rescaling
    pruner = ChannelPruner(model, x, head, keep=1 / 1.5, measure="latency", steps=1)
    assert pruner.target == pytest.approx(1 / 1.5)
    pruner.step()
    assert pruner.goal is not None
    assert pruner.goal.predicted_speedups(model)[64] >= 1.5


def test_unreachable_speedup_fails_before_training_with_the_best_figure(fake_timing: dict) -> None:
    from moonprune.structured import ChannelPruner

    model, x, head = _resnet(width=32)
    fake_timing["speedup"] = 1.2  # the machine never gives more than 1.2x
    with pytest.raises(ConfigError, match=r"cannot reach a 2.00x .* measured 1.20x"):
        ChannelPruner(model, x, head, keep=0.5, measure="latency", steps=1)


def test_a_plan_slower_than_dense_is_refused(fake_timing: dict) -> None:
    from moonprune.structured import ChannelPruner

    model, x, head = _resnet(width=32)
    fake_timing["speedup"] = 0.8
    with pytest.raises(ConfigError, match="slower than the dense one"):
        ChannelPruner(model, x, head, keep=0.5, measure="macs", steps=1)


def test_speedup_beyond_the_table_floor_is_refused(fake_timing: dict) -> None:
    from moonprune.structured import ChannelPruner

    model, x, head = _resnet(width=16)  # 16/32/64: little to remove on a 16 grid
    with pytest.raises(ConfigError, match=r"cannot reach a 20.00x speed-up .* (predicts|measured)"):
        ChannelPruner(model, x, head, keep=0.05, measure="latency", steps=1)


def test_prune_steps_default_follows_epochs() -> None:
    assert resolved_steps(None, 3) == 3
    assert resolved_steps(None, 30) == 4
    assert resolved_steps(2, 30) == 2


def _cfg(**sparsity: object):  # type: ignore[no-untyped-def]
    return build_config({"checkpoint": "d.pt", "data": "digits", "out": "o",
                         "sparsity": {"method": "channel", **sparsity}})  # fmt: skip


def test_channel_defaults_to_a_speedup_target() -> None:
    assert channel_target(_cfg().sparsity) == (1 / DEFAULT_CHANNEL_SPEEDUP, "latency")
    assert channel_target(_cfg(macs_target=0.5).sparsity) == (0.5, "macs")
    assert channel_target(_cfg(speedup=2.0).sparsity) == (0.5, "latency")
    assert channel_target(_cfg(sparsity=0.5).sparsity) == (0.5, "params")
    assert _cfg().sparsity.allocation == "latency"
    with pytest.raises(ConfigError, match="not both"):
        _cfg(speedup=2.0, macs_target=0.5)
    with pytest.raises(ConfigError, match="speedup must be > 1"):
        _cfg(speedup=0.5)
    with pytest.raises(ConfigError, match="--speedup"):
        build_config({"checkpoint": "d.pt", "data": "digits", "out": "o",
                      "sparsity": {"method": "rigl", "speedup": 2.0}})  # fmt: skip
