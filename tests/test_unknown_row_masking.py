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
from moonprune.heads import add_unknown_output_
from moonprune.sparsity import MASKERS, Masker, MaskerConfig, TopologySchedule

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


def test_the_row_counts_within_its_layer_budget() -> None:
    # the unknown row's weights are kept weights of the head: the head keeps its
    # ERK count (at least the row), and the global count is the target
    model, _ = _model("resnet20")
    masker = MASKERS.create("magnitude", MaskerConfig(sparsity=0.99))
    masker.prepare(model, SCHEDULE)
    counts = masker.target_counts()
    ((name, row),) = unknown_rows(model).items()
    assert int(masker.masks[name].sum()) == counts[name] >= masker.masks[name].shape[1]
    total = sum(m.numel() for m in masker.masks.values())
    assert sum(int(m.sum()) for m in masker.masks.values()) == round(0.01 * total)
    del row


def test_uniform_layer_budget_smaller_than_the_row_takes_from_other_layers() -> None:
    # uniform 99%: the head (11 x 64) would keep 7 weights, fewer than the 64 of the row
    model, _ = _model("resnet20")
    masker = MASKERS.create("magnitude", MaskerConfig(sparsity=0.99, distribution="uniform"))
    masker.prepare(model, SCHEDULE)
    ((name, row),) = unknown_rows(model).items()
    assert bool(masker.masks[name][row].all())
    total = sum(m.numel() for m in masker.masks.values())
    assert sum(int(m.sum()) for m in masker.masks.values()) == round(0.01 * total)


def test_state_dict_round_trip_keeps_the_row() -> None:
    model, _ = _model("demo_cnn")
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.95))
    masker.prepare(model, SCHEDULE)
    state = masker.state_dict()
    clone = MASKERS.create("rigl", MaskerConfig(sparsity=0.95))
    clone.prepare(_model("demo_cnn")[0], SCHEDULE)
    clone.load_state_dict(state)
    assert all(torch.equal(clone.masks[n], m) for n, m in masker.masks.items())
