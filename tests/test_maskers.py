"""Every registered masker passes the same contract; then GMP, SET, RigL and registry specifics."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_nets import TinyNet
from torch import nn

from moonprune.errors import ConfigError
from moonprune.sparsity import (
    MASKERS,
    Masker,
    MaskerConfig,
    MaskerRegistry,
    TopologySchedule,
    create_masker,
    keep_counts,
    layer_densities,
)

STEPS, END, EPOCH, INTERVAL = 40, 30, 10, 5
SCHEDULE = TopologySchedule(total_steps=STEPS, end_step=END, steps_per_epoch=EPOCH)
SPARSITY = 0.9  # ERK keeps every TinyNet layer sparse (at 0.8 conv1 is dense)
BUILTIN = ["gmp", "magnitude", "rigl", "set"]
DYNAMIC = ["rigl", "set"]


def _setup(
    name: str, seed: int = 0, interval: int | None = INTERVAL, adam: bool = False
) -> tuple[TinyNet, torch.optim.Optimizer, Masker]:
    torch.manual_seed(0)
    model = TinyNet()
    opt: torch.optim.Optimizer
    if adam:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    config = MaskerConfig(sparsity=SPARSITY, update_interval=interval, seed=seed)
    masker = MASKERS.create(name, config)
    masker.prepare(model, SCHEDULE, opt)
    return model, opt, masker


def _backward(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, masker: Masker, i: int) -> None:
    _backward(model, opt, i)
    masker.step()


def _run(name: str, steps: int = STEPS, seed: int = 0) -> tuple[TinyNet, Masker]:
    model, opt, masker = _setup(name, seed)
    for i in range(steps):
        _train_step(model, opt, masker, i)
    return model, masker


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _measured_sparsity(model: nn.Module) -> float:
    ws = _weights(model)
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _counts(masker: Masker) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masker.masks.items()}


def _erk_counts(model: nn.Module) -> dict[str, int]:
    shapes = {
        n: p.shape for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1
    }
    return keep_counts(shapes, layer_densities(shapes, 1 - SPARSITY, "erk"))


# -- the contract every registered masker (built-in and plug-in) passes --------------------
@pytest.mark.parametrize("name", MASKERS.names())
def test_reaches_target_density(name: str) -> None:
    model, masker = _run(name)
    assert abs(_measured_sparsity(model) - SPARSITY) < 0.005
    assert abs(masker.stats()["density"] - (1 - SPARSITY)) < 0.005


# every masker moonprune ships, the torch.ao adapter included (a plug-in may choose
# another layer distribution; its contract is the global density above)
@pytest.mark.parametrize("name", [*BUILTIN, "torch-ao"])
def test_final_layer_counts_follow_erk(name: str) -> None:
    model, masker = _run(name)
    assert _counts(masker) == _erk_counts(model)
    assert sum(_counts(masker).values()) == round(
        (1 - SPARSITY) * sum(m.numel() for m in masker.masks.values())
    )


@pytest.mark.parametrize("name", MASKERS.names())
def test_pruned_weights_and_momentum_exactly_zero_after_every_step(name: str) -> None:
    model, opt, masker = _setup(name)
    for i in range(STEPS):
        _train_step(model, opt, masker, i)
        for pname, param in masker.params.items():
            pruned = ~masker.masks[pname]
            assert torch.all(param[pruned] == 0) and not param[pruned].signbit().any(), (i, pname)
            assert torch.all(opt.state[param]["momentum_buffer"][pruned] == 0), (i, pname)


def test_adam_moments_zeroed_at_pruned_positions() -> None:
    model, opt, masker = _setup("rigl", adam=True)
    for i in range(2 * INTERVAL):
        _train_step(model, opt, masker, i)
    for pname, param in masker.params.items():
        pruned = ~masker.masks[pname]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(opt.state[param][key][pruned] == 0), (pname, key)


@pytest.mark.parametrize("name", MASKERS.names())
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    ref_model, ref_masker = _run(name)
    model, opt, masker = _setup(name)
    for i in range(17):  # between the updates at steps 15 and 20
        _train_step(model, opt, masker, i)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "masker": masker.state_dict()}, buffer)  # fmt: skip
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what the trainer's resume does
    model2, opt2, masker2 = _setup(name)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    masker2.load_state_dict(saved["masker"])
    for i in range(17, STEPS):
        _train_step(model2, opt2, masker2, i)
    assert masker2.updates == ref_masker.updates
    for n in ref_masker.masks:
        assert torch.equal(ref_masker.masks[n], masker2.masks[n]), n
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), model2.state_dict().items(),
                              strict=True):  # fmt: skip
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", MASKERS.names())
def test_same_seed_same_result(name: str) -> None:
    a, ma = _run(name, seed=3)
    b, mb = _run(name, seed=3)
    assert all(torch.equal(ma.masks[n], mb.masks[n]) for n in ma.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name", MASKERS.names())
def test_finalize_returns_cpu_bool_copies_of_the_masks(name: str) -> None:
    model, masker = _run(name, steps=3)
    masks = masker.finalize()
    assert masks.keys() == masker.masks.keys() == {"conv1.weight", "conv2.weight", "fc.weight"}
    for n, mask in masks.items():
        assert mask.dtype == torch.bool and mask.device.type == "cpu"
        assert torch.equal(mask, masker.masks[n].cpu())
        assert torch.all(model.get_parameter(n)[~mask] == 0)
        mask.fill_(False)
        assert masker.masks[n].any()  # a copy, not the masker's own tensor


# -- magnitude-based starting masks --------------------------------------------------------
@pytest.mark.parametrize("name", ["magnitude", "rigl", "set"])
def test_initial_masks_keep_each_layers_largest_weights(name: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    masker = MASKERS.create(name, MaskerConfig(sparsity=SPARSITY))
    masker.prepare(model, SCHEDULE)
    assert _counts(masker) == _erk_counts(model)
    for n, mask in masker.masks.items():
        assert (~mask).any(), n
        assert dense[n].abs()[mask].min() > dense[n].abs()[~mask].max(), n


def test_magnitude_masks_never_change() -> None:
    model, opt, masker = _setup("magnitude")
    start = {n: m.clone() for n, m in masker.masks.items()}
    for i in range(STEPS):
        _train_step(model, opt, masker, i)
    assert all(torch.equal(start[n], masker.masks[n]) for n in start)
    assert masker.updates == 0


# -- GMP -----------------------------------------------------------------------------------
def test_gmp_starts_dense_and_follows_the_cubic_schedule_per_layer() -> None:
    model, opt, masker = _setup("gmp")
    assert masker.stats()["density"] == 1.0
    sizes = {n: m.numel() for n, m in masker.masks.items()}
    final = _erk_counts(model)
    last = END - 1  # the last step at which the topology may change
    expected = dict(sizes)
    for t in range(1, STEPS + 1):
        before = {n: m.clone() for n, m in masker.masks.items()}
        _train_step(model, opt, masker, t - 1)
        if t <= last and (t % INTERVAL == 0 or t == last):
            f = 1 - (1 - t / last) ** 3
            expected = {n: round(sizes[n] - f * (sizes[n] - final[n])) for n in sizes}
        assert _counts(masker) == expected, t
        assert all(not (masker.masks[n] & ~before[n]).any() for n in before)  # pruned stays
    assert expected == final


@pytest.mark.parametrize("end_step", [0, 1])
def test_gmp_prunes_at_prepare_when_no_step_is_left(end_step: int) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    masker = MASKERS.create("gmp", MaskerConfig(sparsity=SPARSITY))
    masker.prepare(model, TopologySchedule(5, end_step, 5))
    assert _counts(masker) == _erk_counts(model)


def test_gmp_default_interval_gives_about_twenty_pruning_steps() -> None:
    masker = MASKERS.create("gmp", MaskerConfig(sparsity=SPARSITY))
    masker.prepare(TinyNet(), TopologySchedule(total_steps=400, end_step=300, steps_per_epoch=10))
    for _ in range(400):
        masker.step()
    assert masker.updates == 20  # every 300 // 20 = 15 steps up to 285, plus the last step 299
    assert masker.stats()["target_density"] == pytest.approx(masker.stats()["density"])


# -- SET and RigL --------------------------------------------------------------------------
@pytest.mark.parametrize("name", DYNAMIC)
def test_updates_conserve_nonzeros_per_layer(name: str) -> None:
    model, opt, masker = _setup(name)
    counts = _counts(masker)
    changed = 0
    for i in range(STEPS):
        before = {n: m.clone() for n, m in masker.masks.items()}
        _train_step(model, opt, masker, i)
        assert _counts(masker) == counts
        changed += sum(int((before[n] & ~masker.masks[n]).sum()) for n in before)
    assert changed > 0, "the topology never changed"
    assert masker.updates == len(range(INTERVAL, END, INTERVAL))


@pytest.mark.parametrize("name", DYNAMIC)
def test_grown_weights_start_at_zero_with_zero_momentum(name: str) -> None:
    model, opt, masker = _setup(name)
    for i in range(INTERVAL - 1):
        _train_step(model, opt, masker, i)
    before = {n: m.clone() for n, m in masker.masks.items()}
    _backward(model, opt, INTERVAL - 1)  # the optimizer moved pruned weights and momentum
    assert any((p[~before[n]] != 0).any() for n, p in masker.params.items())
    masker.step()  # update
    grown_any = False
    for n, param in masker.params.items():
        grown = masker.masks[n] & ~before[n]
        grown_any |= bool(grown.any())
        assert torch.all(param[grown] == 0), n
        assert torch.all(opt.state[param]["momentum_buffer"][grown] == 0), n
    assert grown_any


def test_set_growth_depends_on_the_seed() -> None:
    _, a = _run("set", seed=1)
    _, b = _run("set", seed=2)
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_set_updates_once_per_epoch_by_default() -> None:
    model, opt, masker = _setup("set", interval=None)
    for i in range(STEPS):
        before = {n: m.clone() for n, m in masker.masks.items()}
        _train_step(model, opt, masker, i)
        changed = any(not torch.equal(before[n], masker.masks[n]) for n in before)
        assert changed == (i + 1 in (EPOCH, 2 * EPOCH)), i + 1  # not at end_step = 30
    assert masker.updates == 2


def _one_layer(
    name: str, end_step: int, sparsity: float = 0.5, **config: float
) -> tuple[nn.Linear, Masker]:
    torch.manual_seed(0)
    layer = nn.Linear(10, 10, bias=False)
    masker = MASKERS.create(
        name,
        MaskerConfig(sparsity=sparsity, distribution="uniform", **config),  # type: ignore[arg-type]
    )
    masker.prepare(nn.Sequential(layer), TopologySchedule(end_step + 10, end_step, 10))
    return layer, masker


def test_rigl_grows_exactly_where_the_dense_gradient_is_largest() -> None:
    layer, masker = _one_layer("rigl", 10, update_interval=1, drop_fraction=0.2)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 101, dtype=torch.float32).view(10, 10))
    masker.prepare(nn.Sequential(layer), TopologySchedule(20, 10, 10))
    flat = masker.masks["0.weight"].view(-1)
    assert flat[50:].all() and not flat[:50].any()  # kept the 50 largest weights
    grad = torch.zeros(100)
    grad[:50] = torch.linspace(1.0, 2.0, 50).flip(0)  # pruned 0..49: decreasing |grad|
    layer.weight.grad = grad.view(10, 10).clone()
    masker.step()  # step 1: r = 0.2 / 2 * (1 + cos(pi / 10))
    k = math.floor(0.1 * (1 + math.cos(math.pi / 10)) * 50)
    flat = masker.masks["0.weight"].view(-1)
    assert k == 9 and int(flat.sum()) == 50
    assert flat[:k].all() and not flat[k:50].any()  # grew the k largest gradients
    assert not flat[50 : 50 + k].any() and flat[50 + k :].all()  # dropped the k smallest
    assert torch.all(layer.weight.view(-1)[:k] == 0)  # grown weights start at 0


def test_rigl_may_regrow_a_weight_it_just_dropped_which_keeps_its_value() -> None:
    layer, masker = _one_layer("rigl", 10, update_interval=1, drop_fraction=0.2)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, 101, dtype=torch.float32).view(10, 10))
    masker.prepare(nn.Sequential(layer), TopologySchedule(20, 10, 10))
    grad = torch.zeros(100)
    grad[50] = 10.0  # the smallest kept weight (51.0) has the largest gradient
    grad[:8] = 1.0
    layer.weight.grad = grad.view(10, 10).clone()
    masker.step()  # k = 9 dropped (flat 50..58), 9 grown: 50 again and 0..7
    flat = masker.masks["0.weight"].view(-1)
    assert flat[50] and flat[:8].all() and not flat[51:59].any() and flat[59:].all()
    assert layer.weight.view(-1)[50] == 51.0  # never left the mask: keeps its value


def test_rigl_update_in_a_training_loop_uses_the_dense_gradient() -> None:
    model, opt, masker = _setup("rigl")
    for i in range(INTERVAL - 1):
        _train_step(model, opt, masker, i)
    _backward(model, opt, INTERVAL - 1)
    r = 0.3 / 2 * (1 + math.cos(math.pi * INTERVAL / END))
    expected = {}
    for n, p in masker.params.items():
        assert p.grad is not None
        mask, w, g = masker.masks[n].view(-1), p.detach().view(-1), p.grad.view(-1).abs()
        assert (g[~mask] != 0).any()  # the gradient is dense
        k = math.floor(r * int(mask.sum()))
        active = mask.nonzero().view(-1)
        dropped = active[w[active].abs().argsort()[:k]]
        kept = mask.clone()
        kept[dropped] = False
        candidates = (~kept).nonzero().view(-1)
        grown = candidates[g[candidates].argsort(descending=True)[:k]]
        kept[grown] = True
        expected[n] = kept
        assert (~mask[grown]).any()  # it grows where the weights were pruned
    masker.step()
    for n, mask in expected.items():
        assert torch.equal(masker.masks[n].view(-1), mask), n


def test_drop_fraction_follows_the_cosine_and_updates_stop_at_end_step() -> None:
    layer, masker = _one_layer("rigl", 20, sparsity=0.75, update_interval=2, drop_fraction=0.5)
    layer.weight.data = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.weight.mul_(masker.masks["0.weight"])
    for t in range(1, 27):
        mask = masker.masks["0.weight"].clone()
        layer.weight.grad = (~mask).float()  # only weights pruned now can grow
        updates = masker.updates
        masker.step()
        r = 0.5 / 2 * (1 + math.cos(math.pi * t / 20)) if t < 20 else 0.0
        assert masker.stats()["drop_fraction"] == pytest.approx(r)
        dropped = int((mask & ~masker.masks["0.weight"]).sum())
        if t < 20 and t % 2 == 0:
            assert masker.updates == updates + 1
            assert dropped == math.floor(r * 25), t
        else:
            assert masker.updates == updates and dropped == 0, t
    assert masker.updates == 9


def test_rigl_default_interval_and_drop_fraction() -> None:
    # min(100, max(1, end_step // 10))
    for end_step, interval in ((5, 1), (30, 3), (500, 50), (2000, 100)):
        layer, masker = _one_layer("rigl", end_step)
        layer.weight.grad = torch.ones_like(layer.weight)
        for _ in range(end_step + 5):
            masker.step()
        assert masker.updates == len(range(interval, end_step, interval)), end_step
    _, masker = _one_layer("rigl", 30)
    assert masker.stats()["drop_fraction"] == pytest.approx(0.3)
    _, masker = _one_layer("set", 30)
    assert masker.stats()["drop_fraction"] == pytest.approx(0.5)


def test_rigl_without_a_gradient_says_what_to_do() -> None:
    _, masker = _one_layer("rigl", 10, update_interval=1)
    with pytest.raises(RuntimeError, match="zero_grad"):
        masker.step()


# -- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [("sparsity", 1.5), ("sparsity", 0.0), ("sparsity", 1.0), ("sparsity", -0.1),
     ("update_interval", 0), ("update_interval", 2.5), ("drop_fraction", 1.0),
     ("drop_fraction", 0.0), ("distribution", "normal"), ("seed", 1.5)],
)  # fmt: skip
def test_bad_config_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field if field != "distribution" else "erk"):
        MaskerConfig(**{field: value})  # type: ignore[arg-type]


def test_bad_schedule_and_model_are_refused() -> None:
    with pytest.raises(ConfigError, match="end_step"):
        TopologySchedule(total_steps=10, end_step=11, steps_per_epoch=5)
    with pytest.raises(ConfigError, match="no conv or linear"):
        MASKERS.create("rigl", MaskerConfig()).prepare(nn.Sequential(nn.ReLU()), SCHEDULE)
    with pytest.raises(ConfigError, match="MaskerConfig"):
        MASKERS.create("rigl", {"sparsity": 0.9})  # type: ignore[arg-type]


def test_state_from_another_model_is_refused() -> None:
    _, _, masker = _setup("set")
    _, other = _one_layer("set", 10)
    with pytest.raises(ConfigError, match="prunable layers"):
        other.load_state_dict(masker.state_dict())


# -- registry ------------------------------------------------------------------------------
def test_unknown_name_lists_the_valid_ones_and_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'rigl'") as info:
        create_masker("rigel", MaskerConfig())
    assert all(n in str(info.value) for n in MASKERS.names())
    assert set(BUILTIN) <= set(MASKERS.describe())
    assert all(MASKERS.describe().values())


def test_register_works_as_a_decorator_on_a_new_registry() -> None:
    registry = MaskerRegistry()

    @registry.register
    class DenseMasker(Masker):
        name = "dense"
        description = "keeps everything"

        def initial_masks(self) -> dict[str, torch.Tensor]:
            return {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}

    assert registry.names() == ["dense"]
    assert registry.describe() == {"dense": "keeps everything"}
    assert isinstance(registry.create("dense", MaskerConfig()), DenseMasker)
    assert registry.origin("dense") != "moonprune"
    assert "dense" not in MASKERS.names()  # no global side effect
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(type("Other", (DenseMasker,), {}))
    with pytest.raises(TypeError, match="Masker"):
        registry.register(int)  # type: ignore[type-var]


def test_plugin_found_through_its_entry_point() -> None:
    """tests/conftest.py installed tests/plugins/random-masker before collection."""
    assert "random" in MASKERS.names()
    assert MASKERS.origin("random") == "moonprune-random-masker 0.1.0"
    assert MASKERS.origin("rigl") == "moonprune"
    assert not MASKERS.plugin_errors


def test_copied_masker_state_is_independent() -> None:
    _, _, masker = _setup("set")
    state = copy.deepcopy(masker.state_dict())
    next(iter(state["masks"].values())).fill_(True)
    assert not next(iter(masker.masks.values())).all()
