"""The unknown row of a K+1 head is never pruned, by any registered masker.

At 95% and 99% sparsity, on the demo CNN and ResNet-20 with the K+1 head: after
``prepare``, after every step (RigL/SET drop and regrow, GMP prunes) and after
``finalize``, every weight of the unknown row is active and nonzero, and the global
sparsity is still the target.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moonprune import models
from moonprune.conventions import unknown_rows
from moonprune.errors import ConfigError
from moonprune.heads import add_unknown_output_
from moonprune.sparsity import (
    MASKERS,
    Masker,
    MaskerConfig,
    TopologySchedule,
    keep_counts,
    layer_densities,
)

STEPS, END, EPOCH, INTERVAL = 12, 9, 3, 2
SCHEDULE = TopologySchedule(total_steps=STEPS, end_step=END, steps_per_epoch=EPOCH)
K = 10
ARCHS = {
    "demo_cnn": (lambda: models.demo_cnn(num_classes=K, in_channels=1, width=8), (1, 8, 8)),
    "resnet20": (lambda: models.resnet20(num_classes=K, in_channels=3), (3, 8, 8)),
}


def _model(arch: str) -> tuple[nn.Module, tuple[int, ...]]:
    factory, shape = ARCHS[arch]
    torch.manual_seed(0)
    model = factory()
    add_unknown_output_(model, torch.randn(2, *shape))
    return model.train(), shape


def _unknown_row(model: nn.Module, masker: Masker) -> tuple[torch.Tensor, torch.Tensor]:
    ((name, row),) = unknown_rows(model).items()
    return masker.masks[name][row], dict(model.named_parameters())[name][row]


def _check(model: nn.Module, masker: Masker, sparsity: float, when: str) -> None:
    mask, weight = _unknown_row(model, masker)
    assert bool(mask.all()), f"{when}: {int((~mask).sum())} unknown-row weights masked"
    assert bool((weight != 0).all()), f"{when}: unknown-row weights are zero"
    kept = sum(int(m.sum()) for m in masker.masks.values())
    total = sum(m.numel() for m in masker.masks.values())
    assert abs(masker.stats()["density"] - kept / total) < 1e-12
    if masker.name != "gmp" or masker.step_count >= END - 1:  # GMP prunes gradually
        assert abs(1 - kept / total - sparsity) < 0.005, when


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("sparsity", [0.95, 0.99])
@pytest.mark.parametrize("name", MASKERS.names())
def test_unknown_row_stays_active(name: str, sparsity: float, arch: str) -> None:
    model, shape = _model(arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    masker = MASKERS.create(name, MaskerConfig(sparsity=sparsity, update_interval=INTERVAL))
    masker.prepare(model, SCHEDULE, opt)
    _check(model, masker, sparsity, "prepare")
    g = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, K, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        masker.step()
        _check(model, masker, sparsity, f"step {i + 1}")
    if name in ("rigl", "set", "gmp"):
        assert masker.updates >= 3  # the topology really changed
    masks = masker.finalize()
    _check(model, masker, sparsity, "finalize")
    ((layer, row),) = unknown_rows(model).items()
    assert bool(masks[layer][row].all())


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("sparsity", [0.95, 0.99])
def test_the_row_counts_in_the_global_budget(distribution: str, sparsity: float) -> None:
    # the row's weights are kept weights: the global count is the target; the rest is
    # spread over the other weights, the head's known rows as a (K, in) layer
    model, _ = _model("resnet20")
    masker = MASKERS.create("magnitude", MaskerConfig(sparsity=sparsity, distribution=distribution))
    masker.prepare(model, SCHEDULE)
    ((name, row),) = unknown_rows(model).items()
    total = sum(m.numel() for m in masker.masks.values())
    assert sum(int(m.sum()) for m in masker.masks.values()) == round((1 - sparsity) * total)
    mask = masker.masks[name]
    shapes = {n: m.shape for n, m in masker.masks.items()}
    free = {**shapes, name: (row, mask.shape[1])}
    rest = ((1 - sparsity) * total - mask.shape[1]) / (total - mask.shape[1])
    expected = keep_counts(free, layer_densities(free, rest, distribution))
    assert bool(mask[row].all())
    assert int(mask[:row].sum()) == expected[name] > 0  # the known rows keep their share
    assert {n: int(m.sum()) for n, m in masker.masks.items() if n != name} == {
        n: c for n, c in expected.items() if n != name
    }


def test_a_budget_below_the_row_is_an_error() -> None:
    model, _ = _model("demo_cnn")  # 6184 weights, a row of 32: 99.5% keeps 31
    with pytest.raises(ConfigError, match="unknown output"):
        MASKERS.create("magnitude", MaskerConfig(sparsity=0.995)).prepare(model, SCHEDULE)


def test_state_dict_round_trip_keeps_the_row() -> None:
    model, _ = _model("demo_cnn")
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.95))
    masker.prepare(model, SCHEDULE)
    state = masker.state_dict()
    clone = MASKERS.create("rigl", MaskerConfig(sparsity=0.95))
    clone.prepare(_model("demo_cnn")[0], SCHEDULE)
    clone.load_state_dict(state)
    assert all(torch.equal(clone.masks[n], m) for n, m in masker.masks.items())
