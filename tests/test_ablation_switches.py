"""The ablation of issue 16 (``benchmarks/reliability.py --ablation``) turns each fix
off by swapping a library function: each swap must hit the function the library really
calls, or the ablation silently measures the fixed code twice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import moonprune.heads as heads
import moonprune.objectives as objectives
import moonprune.sparsity.budget as budget
from moonprune.models import demo_cnn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reliability():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "bench_reliability", ROOT / "benchmarks" / "reliability.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_gradient_switch_detaches_p_unknown(reliability) -> None:  # type: ignore[no-untyped-def]
    logits = torch.tensor([[0.2, 0.1, 0.3, 0.0]], requires_grad=True)
    target = torch.tensor([0])
    grad_fixed = torch.autograd.grad(objectives.moon_loss(logits, target, 2.0), logits)[0]
    with reliability.without("gradient"):
        grad_off = torch.autograd.grad(objectives.moon_loss(logits, target, 2.0), logits)[0]
    assert not torch.allclose(grad_fixed[0, -1], grad_off[0, -1])
    restored = torch.autograd.grad(objectives.moon_loss(logits, target, 2.0), logits)[0]
    assert torch.equal(restored, grad_fixed)


def test_init_switch_starts_the_unknown_row_dead(reliability) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    live = demo_cnn(num_classes=3, width=4).eval()
    dead = demo_cnn(num_classes=3, width=4).eval()
    dead.load_state_dict(live.state_dict())
    heads.add_unknown_output_(live, x[:2])
    with reliability.without("init"):
        heads.add_unknown_output_(dead, x[:2])
    with torch.no_grad():
        p_live = live(x).softmax(-1)[:, -1]
        p_dead = dead(x).softmax(-1)[:, -1]
    assert float(p_dead.max()) < 1e-3 < float(p_live.mean())


def test_exemption_switch_lets_maskers_see_the_unknown_row(reliability) -> None:  # type: ignore[no-untyped-def]
    model = demo_cnn(num_classes=3, width=4).eval()
    heads.add_unknown_output_(model, torch.randn(2, 1, 8, 8))
    before = budget.unknown_rows
    with reliability.without("exemption"):
        assert budget.unknown_rows(model) == {}
    assert budget.unknown_rows is before and budget.unknown_rows(model)
