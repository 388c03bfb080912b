"""Every registered masker passes the same contract; RigL, SET, GMP, ERK specifics."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moonprune.errors import ConfigError
from moonprune.sparsity import (
    MASKERS,
    Masker,
    MaskerConfig,
    RigLMasker,
    TopologySchedule,
    keep_counts,
    layer_densities,
)

STEPS = 40
SCHEDULE = TopologySchedule(total_steps=STEPS, end_step=30, steps_per_epoch=10)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.fc(x)


def _setup(name: str, seed: int = 0, sparsity: float = 0.8):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    masker = MASKERS.create(name, MaskerConfig(sparsity=sparsity, update_interval=5, seed=seed))
    masker.prepare(model, SCHEDULE, opt)
    return model, opt, masker


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, masker: Masker, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    masker.step()


def _run(name: str, steps: int = STEPS, seed: int = 0):
    model, opt, masker = _setup(name, seed)
    for i in range(steps):
        _train_step(model, opt, masker, i)
    return model, opt, masker


def _sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize("name", MASKERS.names())
def test_reaches_target_density(name: str) -> None:
    model, _, masker = _run(name)
    assert abs(_sparsity(model) - 0.8) < 0.005
    assert masker.stats()["density"] == pytest.approx(0.2, abs=0.005)


@pytest.mark.parametrize("name", MASKERS.names())
def test_pruned_weights_exactly_zero_after_every_step(name: str) -> None:
    model, opt, masker = _setup(name)
    for i in range(STEPS):
        _train_step(model, opt, masker, i)
        for pname, param in masker.params.items():
            assert torch.all(param[~masker.masks[pname]] == 0), (i, pname)
            buf = opt.state[param]["momentum_buffer"]
            assert torch.all(buf[~masker.masks[pname]] == 0), (i, pname)


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_updates_conserve_nonzeros_per_layer(name: str) -> None:
    model, opt, masker = _setup(name)
    counts = {n: int(m.sum()) for n, m in masker.masks.items()}
    changed = False
    for i in range(STEPS):
        before = {n: m.clone() for n, m in masker.masks.items()}
        _train_step(model, opt, masker, i)
        assert {n: int(m.sum()) for n, m in masker.masks.items()} == counts
        changed |= any(not torch.equal(before[n], masker.masks[n]) for n in before)
    assert changed, "the topology never changed"
    assert masker.updates == len([s for s in range(1, 30) if s % 5 == 0])


@pytest.mark.parametrize("name", MASKERS.names())
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    ref_model, _, ref_masker = _run(name)
    model, opt, masker = _setup(name)
    for i in range(17):
        _train_step(model, opt, masker, i)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
             copy.deepcopy(masker.state_dict()))  # fmt: skip
    model2, opt2, masker2 = _setup(name)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    masker2.load_state_dict(saved[2])
    for i in range(17, STEPS):
        _train_step(model2, opt2, masker2, i)
    for n in ref_masker.masks:
        assert torch.equal(ref_masker.masks[n], masker2.masks[n]), n
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), model2.state_dict().items(),
                              strict=True):  # fmt: skip
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", MASKERS.names())
def test_same_seed_same_result(name: str) -> None:
    a, _, ma = _run(name, seed=3)
    b, _, mb = _run(name, seed=3)
    assert all(torch.equal(ma.masks[n], mb.masks[n]) for n in ma.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_set_growth_depends_on_seed() -> None:
    _, _, a = _run("set", seed=1)
    _, _, b = _run("set", seed=2)
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_rigl_grows_where_the_dense_gradient_is_largest() -> None:
    layer = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 101, dtype=torch.float32).view(10, 10))
    masker = RigLMasker(MaskerConfig(sparsity=0.5, distribution="uniform", update_interval=1,
                                     drop_fraction=0.2))  # fmt: skip
    masker.prepare(nn.Sequential(layer), TopologySchedule(10, 10, 10))
    mask0 = masker.masks["0.weight"].clone()
    assert mask0.view(-1)[50:].all() and not mask0.view(-1)[:50].any()  # largest 50 kept
    # dense gradient: largest at flat positions 0..9 (all pruned); zero elsewhere
    grad = torch.zeros(100)
    grad[:10] = torch.arange(10, 0, -1, dtype=torch.float32)
    layer.weight.grad = grad.view(10, 10).clone()
    masker.step()  # step 1: r = 0.2/2 * (1 + cos(pi/10)) -> k = floor(r * 50)
    k = math.floor(masker.drop_fraction(1) * 50)
    flat = masker.masks["0.weight"].view(-1)
    assert int(flat.sum()) == 50
    assert flat[:k].all() and not flat[k:50].any()  # grew exactly the top-k gradients
    assert not flat[50 : 50 + k].any()  # dropped the k smallest active weights
    assert torch.all(layer.weight.view(-1)[:k] == 0)  # grown weights start at 0


def test_rigl_reads_the_dense_gradient_not_a_masked_one() -> None:
    model, opt, masker = _setup("rigl")
    x = torch.randn(4, 1, 6, 6)
    opt.zero_grad()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    grad = model.conv2.weight.grad
    assert grad is not None
    assert (~masker.masks["conv2.weight"]).any()
    assert (grad[~masker.masks["conv2.weight"]] != 0).any()


def test_drop_fraction_follows_cosine_and_stops_at_end_step() -> None:
    model, opt, masker = _setup("set")
    assert masker.drop_fraction(0) == pytest.approx(0.5)
    assert masker.drop_fraction(15) == pytest.approx(0.25)
    assert masker.drop_fraction(30) == pytest.approx(0.0)
    for i in range(STEPS):
        before = {n: m.clone() for n, m in masker.masks.items()}
        _train_step(model, opt, masker, i)
        if masker.step_count >= SCHEDULE.end_step:
            assert all(torch.equal(before[n], masker.masks[n]) for n in before)


def test_gmp_starts_dense_and_follows_the_cubic_schedule() -> None:
    model, opt, masker = _setup("gmp")
    assert masker.stats()["density"] == 1.0
    densities = []
    for i in range(STEPS):
        _train_step(model, opt, masker, i)
        densities.append(masker.stats()["density"])
    assert all(a >= b for a, b in itertools.pairwise(densities))
    assert densities[9] == pytest.approx(1 - 0.8 * (1 - (1 - 10 / 30) ** 3), abs=0.02)
    assert densities[28] == pytest.approx(0.2, abs=0.005)


def test_erk_totals_dense_capping_and_uniform() -> None:
    shapes = {"conv1": (16, 1, 3, 3), "conv2": (64, 16, 3, 3), "fc": (10, 64)}
    total = sum(math.prod(s) for s in shapes.values())
    for density in (0.05, 0.1, 0.2, 0.5):
        d = layer_densities(shapes, density, "erk")
        kept = sum(d[n] * math.prod(s) for n, s in shapes.items())
        assert kept == pytest.approx(density * total)
        assert d["conv1"] > d["conv2"]
        assert max(d.values()) <= 1.0
        counts = keep_counts(shapes, d, density)
        assert sum(counts.values()) == round(density * total)
    assert layer_densities(shapes, 0.5, "erk")["conv1"] == 1.0  # capped dense
    assert set(layer_densities(shapes, 0.3, "uniform").values()) == {0.3}


def test_registry_names_the_closest_valid_method() -> None:
    with pytest.raises(ConfigError, match="did you mean 'rigl'"):
        MASKERS.create("rigel", MaskerConfig())
    assert {"gmp", "magnitude", "rigl", "set"} <= set(MASKERS.describe())


def test_plugin_found_through_its_entry_point() -> None:
    """tests/conftest.py installed tests/plugins/random-masker before collection."""
    assert "random" in MASKERS.names()
    assert MASKERS.origin("random") == "moonprune-random-masker 0.1.0"
    assert MASKERS.origin("rigl") == "moonprune"
    assert not MASKERS.plugin_errors


@pytest.mark.parametrize("bad", [1.5, 0.0, 1.0, -0.1])
def test_sparsity_out_of_range(bad: float) -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        MaskerConfig(sparsity=bad)
