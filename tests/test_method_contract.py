"""The lifecycle every pruning method shares, maskers and channel pruning alike:
prepare -> step -> finalize, with ``state_dict`` for ``--resume``, and the registry
entry that says what the method is and which options it takes
(:mod:`moonprune.sparsity.methods`). Masker-only details are in test_maskers.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_nets import TinyNet
from torch import nn

from moonprune.errors import ConfigError
from moonprune.sparsity import METHODS, Masker, TopologySchedule
from moonprune.sparsity.channel.pruner import ChannelPruner
from moonprune.sparsity.channel.structure import apply_structure_, module_structure
from moonprune.sparsity.config import CHANNEL_OPTIONS, UNSTRUCTURED_OPTIONS, SparsityConfig

BUILTIN = [n for n in METHODS.names() if METHODS.info(n).origin == "moonprune"]
TARGET = 0.5  # fraction of weights (maskers: nonzero; channel: parameters) kept
ITERS, CHANNEL_STEPS = 8, 2
#: a valid non-default value of every method-specific option
NON_DEFAULT: dict[str, Any] = {
    "speedup": 2.0, "macs_target": 0.5, "allocation": "global", "round_to": 8,
    "importance": "taylor", "steps": 2, "latency_batch": 8, "threads": 1,
    "distribution": "uniform", "update_interval": 10, "drop_fraction": 0.2,
}  # fmt: skip


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    x, y = _batch(i)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _config(name: str) -> SparsityConfig:
    if METHODS.is_structured(name):
        return SparsityConfig(method=name, sparsity=TARGET, allocation="global")  # no timing
    return SparsityConfig(method=name, sparsity=TARGET, distribution="uniform")


def _create(name: str, model: nn.Module) -> Masker | ChannelPruner:
    return METHODS.create(name, _config(name), seed=0, model=model, example=_batch(0)[0],
                          head_layer="fc", steps=CHANNEL_STEPS)  # fmt: skip


def _kept(name: str, model: nn.Module, method: Masker | ChannelPruner) -> float:
    if isinstance(method, ChannelPruner):
        return method.stats()["params_fraction"]
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _run(name: str, stop: int | None = None, state: dict[str, Any] | None = None) -> Any:
    """The method's whole lifecycle on TinyNet; ``stop`` returns the resumable state
    after that many units (masker: optimizer steps; channel: pruning stages), ``state``
    continues from one."""
    torch.manual_seed(0)
    model = TinyNet()
    method = _create(name, model)
    if isinstance(method, ChannelPruner):
        return _run_channel(model, method, stop, state)
    opt = _sgd(model)
    method.prepare(model, TopologySchedule(ITERS, ITERS - 2, 2), opt)
    first = 0
    if state is not None:
        method.load_state_dict(state["method"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        first = state["at"]
    for i in range(first, ITERS):
        if i == stop:
            return {"method": copy.deepcopy(method.state_dict()), "at": i,
                    "model": copy.deepcopy(model.state_dict()),
                    "opt": copy.deepcopy(opt.state_dict())}  # fmt: skip
        _train_step(model, opt, i)
        method.step()
    return model, method, method.finalize()


def _run_channel(
    model: nn.Module, pruner: ChannelPruner, stop: int | None, state: dict[str, Any] | None
) -> Any:
    first = 0
    if state is not None:
        pruner.load_state_dict(state["method"])  # on the dense network, then re-shape
        apply_structure_(model, state["structure"], state["model"])
        model.load_state_dict(state["model"])
        first = state["at"]
    per_stage = ITERS // CHANNEL_STEPS
    for stage in range(first, CHANNEL_STEPS):
        if stage == stop:
            return {"method": copy.deepcopy(pruner.state_dict()), "at": stage,
                    "structure": module_structure(model),
                    "model": copy.deepcopy(model.state_dict())}  # fmt: skip
        pruner.step()
        opt = _sgd(model)  # pruning replaced the parameters
        for i in range(stage * per_stage, (stage + 1) * per_stage):
            _train_step(model, opt, i)
    return model, pruner, pruner.finalize()


@pytest.mark.parametrize("name", METHODS.names())
def test_registry_entry_says_what_the_method_is(name: str) -> None:
    info = METHODS.info(name)
    assert info.name == name and info.description and info.origin
    assert info.steps in ("after every optimizer step", "between fine-tuning stages")
    assert info.flags()[0] == "--sparsity" and len(info.flags()) == len(info.options) + 1
    assert set(info.options) == set(CHANNEL_OPTIONS if info.structured else UNSTRUCTURED_OPTIONS)


@pytest.mark.parametrize("name", BUILTIN)
def test_the_config_takes_exactly_the_options_the_entry_lists(name: str) -> None:
    own = set(METHODS.info(name).options)
    for option, value in NON_DEFAULT.items():
        if option in own:
            SparsityConfig(method=name, sparsity=TARGET, **{option: value})
        else:
            with pytest.raises(ConfigError, match="applies to"):
                SparsityConfig(method=name, sparsity=TARGET, **{option: value})


@pytest.mark.parametrize("name", BUILTIN)
def test_lifecycle_reaches_the_target_and_finalizes(name: str) -> None:
    model, method, record = _run(name)
    kept = _kept(name, model, method)
    if METHODS.is_structured(name):
        assert 0.3 < kept <= TARGET + 1e-9  # parameters of the smaller network
        assert record == module_structure(model)
        assert record["conv2"]["out_channels"] < 16 and record["fc"]["out_features"] == 5
    else:
        assert kept == pytest.approx(TARGET, abs=0.02)  # nonzero weights
        assert set(record) == {n for n, p in model.named_parameters() if p.dim() > 1}
    assert model(_batch(99)[0]).shape == (16, 5)


@pytest.mark.parametrize("name", BUILTIN)
def test_state_dict_resumes_bit_identically(name: str) -> None:
    whole, _, _ = _run(name)
    half = ITERS // 2 if not METHODS.is_structured(name) else 1
    resumed, _, _ = _run(name, state=_run(name, stop=half))
    for (key, a), (_, b) in zip(
        whole.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key


def test_channel_finalize_before_every_step_is_refused() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    pruner = _create("channel", model)
    assert isinstance(pruner, ChannelPruner)
    pruner.step()
    with pytest.raises(RuntimeError, match="1 of 2"):
        pruner.finalize()


def test_unknown_method_names_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'channel'"):
        METHODS.info("chanel")
    with pytest.raises(ConfigError, match="built on the model"):
        METHODS.create("channel", _config("channel"))
