"""The latency allocation: candidate networks timed, one chosen, its widths reached.

Timing is modelled (``tests/fake_timer.py``, or a timer passed in), so these tests
check the logic, never this machine's speed; one test runs the real onnxruntime timer
without asserting a speed. The measured speed-ups are in benchmarks/structured.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pytest
import torch
from torch import nn

from moonprune import models
from moonprune.config import DEFAULT_CHANNEL_SPEEDUP, build_config
from moonprune.errors import ConfigError
from moonprune.heads import add_unknown_output_
from moonprune.sparsity.channel.plan import Candidate, ChannelPlan, Target, broadcast_plan
from moonprune.sparsity.channel.pruner import ChannelPruner
from moonprune.sparsity.channel.search import DEFAULT_SPEEDUP, TOLERANCE, choose
from moonprune.sparsity.channel.settings import channel_target, resolved_steps
from moonprune.sparsity.channel.structure import count_macs_params, layer_widths

pytest.importorskip("torch_pruning")


def _resnet(width: int = 32) -> tuple[nn.Module, torch.Tensor, str]:
    torch.manual_seed(0)
    model = models.resnet8(num_classes=5, in_channels=3, width=width).eval()
    x = torch.randn(4, 3, 16, 16)
    return model, x, add_unknown_output_(model, x)


def _candidate(macs: float, b1: float, b64: float) -> Candidate:
    return Candidate(16, macs, macs, {"conv": round(64 * macs)}, {1: b1, 64: b64})


def test_auto_keeps_the_least_pruned_candidate_fast_enough_at_both_batches() -> None:
    need1, need64 = DEFAULT_SPEEDUP["batch 1"], DEFAULT_SPEEDUP["deployment batch"]
    found = [
        _candidate(0.8, need1 + 0.2, need64 - 0.1),  # not enough at batch 64
        _candidate(0.6, need1 + 0.1, need64 + 0.1),  # the one
        _candidate(0.4, need1 + 0.5, need64 + 0.6),  # faster, but pruned more
    ]
    assert choose(found, Target("auto"), 64).macs_fraction == 0.6
    # none fast enough: the fastest at both batches, if clearly faster than dense
    slow = [_candidate(0.8, 1.02, 1.3), _candidate(0.5, 1.2, 1.15), _candidate(0.3, 1.25, 1.1)]
    assert choose(slow, Target("auto"), 64).macs_fraction == 0.5
    # none faster than dense at both batches: refused, with the best figures and a hint
    never = [_candidate(0.8, 0.9, 1.4), _candidate(0.4, 1.3, 0.97)]
    with pytest.raises(ConfigError, match=r"cannot make this .* 1\.30x at batch 1, 0\.97x at"):
        choose(never, Target("auto"), 64)


def test_a_speedup_target_takes_the_nearest_candidate_not_slower_at_batch_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    found = [_candidate(0.7, 1.2, 1.5), _candidate(0.5, 0.9, 2.0), _candidate(0.4, 1.3, 2.15)]
    assert choose(found, Target("speedup", 2.0), 64).macs_fraction == 0.4  # 0.5: slower at b1
    assert not caplog.records  # 2.15x is within 10% of 2
    # none within 10% (a grid's step jumps over it): the nearest is kept, the user told
    gap = [_candidate(0.7, 1.2, 1.5), _candidate(0.3, 1.3, 2.4)]
    assert choose(gap, Target("speedup", 2.0), 64).macs_fraction == 0.3
    assert "no candidate measured within 10% of it at batch 64" in caplog.text
    assert "keeping the nearest, 2.40x (30% of the MACs)" in caplog.text
    with pytest.raises(ConfigError, match=r"cannot reach a 3.00x .* best measured 2.15x"):
        choose(found, Target("speedup", 3.0), 64)


def test_a_mac_target_takes_the_fastest_grid_or_is_refused_when_slower() -> None:
    found = [_candidate(0.5, 1.1, 1.4), _candidate(0.48, 1.2, 1.6)]
    assert choose(found, Target("macs", 0.5), 64).macs_fraction == 0.48
    as_fast = [_candidate(0.5, 0.99, 1.3)]  # no faster at batch 1 (timing noise): still kept
    assert choose(as_fast, Target("params", 0.5), 64).macs_fraction == 0.5
    with pytest.raises(ConfigError, match=r"slower than the dense one .* --allocation global"):
        choose([_candidate(0.5, 0.8, 1.4)], Target("macs", 0.5), 64)


@dataclass
class MacTimer:
    """Latency = a fixed cost of the dense MACs + batch x MACs: smooth, and at batch 1
    only a deep cut is much faster (as when a fixed cost per operator
    dominates). Records how many networks each call timed."""

    calls: list[int] = field(default_factory=list)

    def __call__(
        self,
        dense: nn.Module,
        nets: Mapping[str, nn.Module],
        example: torch.Tensor,
        batches: tuple[int, ...],
        _threads: int,
    ) -> dict[str, dict[int, float]]:
        self.calls.append(len(nets))
        full = count_macs_params(dense, example)[0]

        def ms(macs: float, batch: int) -> float:
            return full + batch * macs

        return {n: {b: ms(full, b) / ms(count_macs_params(m, example)[0], b) for b in batches}
                for n, m in nets.items()}  # fmt: skip


def test_planned_widths_are_reached_in_steps_on_the_grid() -> None:
    model, x, head = _resnet(width=32)
    dense = layer_widths(model)
    timer = MacTimer()
    pruner = ChannelPruner(model, x, head, keep=None, measure="auto", steps=3, timer=timer)
    plan = pruner.plan
    assert plan is not None and timer.calls == [len(plan.candidates)]  # one timing pass
    # auto: the least-pruned candidate meeting the default at both batches
    need = {"1": DEFAULT_SPEEDUP["batch 1"], "64": DEFAULT_SPEEDUP["deployment batch"]}
    eligible = [c for c in plan.candidates if all(c["speedup"][b] >= v for b, v in need.items())]
    least = max(eligible, key=lambda c: c["macs_fraction"])
    assert {str(b): v for b, v in plan.speedup.items()} == least["speedup"]
    assert len(eligible) < len(plan.candidates)  # some were not fast enough
    totals = []
    for _ in range(3):
        pruner.step()
        totals.append(sum(layer_widths(model).values()))
    assert totals[0] > totals[1] > totals[2]  # in steps, not all at once
    assert layer_widths(model) == plan.widths  # exactly the measured network
    changed = {n: w for n, w in plan.widths.items() if w < dense[n]}
    assert changed and all(w % plan.grid == 0 for w in changed.values()), changed
    assert model(x).shape == (4, 6)


def test_a_speedup_between_candidates_is_refined_to_within_tolerance() -> None:
    model, x, head = _resnet(width=32)
    timer = MacTimer()
    want = 2.9  # the grid-8 candidates nearest give 2.57x and 3.33x at batch 64: > 10% off
    pruner = ChannelPruner(model, x, head, keep=1 / want, measure="latency", steps=1,
                           round_to=8, timer=timer)  # fmt: skip
    # the first pass, then one new candidate per refinement
    assert pruner.plan is not None and len(timer.calls) >= 2 and set(timer.calls[1:]) == {1}
    got = pruner.plan.speedup[64]
    assert abs(got - want) <= TOLERANCE * want, (got, pruner.plan.candidates)
    pruner.step()
    kept = count_macs_params(model, x)[0] / pruner.dense_macs
    assert math.isclose((1 + 64) / (1 + 64 * kept), got, rel_tol=1e-6)  # what was timed


def test_a_refinement_landing_on_timed_widths_tries_the_next_bracket() -> None:
    from moonprune.sparsity.channel.search import _refinement

    def cand(grid: int, macs: float, b64: float, w: int) -> Candidate:
        return Candidate(grid, macs, macs, {"conv": w}, {1: 1.2, 64: b64})

    found = [cand(16, 0.5, 1.6, 48), cand(16, 0.3, 2.7, 32),  # tightest bracket of 2.0
             cand(8, 0.45, 1.7, 40), cand(8, 0.2, 2.8, 24)]  # fmt: skip

    @dataclass
    class Search:  # grid 16 jumps back to timed widths; grid 8 has a width in between
        batch: int = 64
        asked: list[tuple[int, float]] = field(default_factory=list)

        def prune(self, grid: int, fractions: tuple[float, ...], _m: str) -> list[Candidate]:
            self.asked.append((grid, fractions[0]))
            return [cand(16, 0.3, 0.0, 32)] if grid == 16 else [cand(8, 0.36, 0.0, 32 + 4)]

    search = Search()
    made = _refinement(search, found, 2.0)  # type: ignore[arg-type]
    assert made is not None and made.grid == 8 and made.widths == {"conv": 36}
    assert [g for g, _ in search.asked] == [16, 8]
    # an interpolated fraction between the bracket's two
    assert 0.3 < search.asked[0][1] < 0.5 and 0.2 < search.asked[1][1] < 0.45


def test_auto_stops_at_its_floor_where_a_speedup_may_cut_deeper() -> None:
    """The default keeps at least AUTO_MIN_FRACTION of the MACs (accuracy and AUROC
    collapsed below it in benchmarks/structured.py); --speedup may go to FRACTIONS[-1]."""
    from moonprune.sparsity.channel.search import AUTO_MIN_FRACTION, FRACTIONS

    lowest = {}
    for measure, keep in (("auto", None), ("latency", 1 / 5.0)):
        model, x, head = _resnet(width=32)
        pruner = ChannelPruner(model, x, head, keep=keep, measure=measure, steps=1,
                               round_to=8, timer=MacTimer())  # fmt: skip
        assert pruner.plan is not None
        lowest[measure] = min(c["macs_fraction"] for c in pruner.plan.candidates)
    assert lowest["auto"] > AUTO_MIN_FRACTION - 0.05
    assert lowest["latency"] < AUTO_MIN_FRACTION - 0.05 and FRACTIONS[-1] < AUTO_MIN_FRACTION


def test_an_unreachable_speedup_is_refused_before_pruning() -> None:
    model, x, head = _resnet(width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"cannot reach a 20.00x speed-up at batch 64"):
        ChannelPruner(model, x, head, keep=0.05, measure="latency", steps=1, timer=MacTimer())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@dataclass
class FakeDist:
    """Two ranks; ``all_reduce_sum`` adds what the other rank sent."""

    rank: int
    other: list[float]
    enabled: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return [a + b for a, b in zip(values, self.other, strict=True)]


def test_rank_0_plan_is_what_every_rank_prunes_to() -> None:
    model, _, _ = _resnet(width=32)
    widths = {n: max(8, w // 2) for n, w in layer_widths(model).items()}
    plan = ChannelPlan(widths, 16, 64, 2, {1: 1.4, 64: 1.9})
    names = sorted(widths)
    sent = [1.0, 16.0, 1.4, 1.9, *(float(widths[n]) for n in names)]
    assert broadcast_plan(plan, model, FakeDist(0, [0.0] * len(sent)), 64, 2) is plan
    received = broadcast_plan(None, model, FakeDist(1, sent), 64, 2)
    assert received is not None and received.widths == widths and received.grid == 16
    assert received.speedup == {1: 1.4, 64: 1.9}
    with pytest.raises(ConfigError, match="rank 0 could not plan"):
        broadcast_plan(None, model, FakeDist(1, [0.0] * len(sent)), 64, 2)


def test_the_real_timer_measures_candidates(real_timer: None) -> None:
    from moonprune.speed import measure_speedups

    model, x, _ = _resnet(width=16)
    slim, _, _ = _resnet(width=8)  # what pruning every layer to half its width gives
    measured = measure_speedups(model, {"slim": slim}, x, (1, 8), threads=1)
    assert set(measured) == {"slim"} and set(measured["slim"]) == {1, 8}
    assert all(math.isfinite(v) and v > 0 for v in measured["slim"].values())


def test_prune_steps_default_follows_epochs() -> None:
    assert resolved_steps(None, 3) == 3
    assert resolved_steps(None, 30) == 4
    assert resolved_steps(2, 30) == 2


def _cfg(**sparsity: object):  # type: ignore[no-untyped-def]
    return build_config({"checkpoint": "d.pt", "data": "digits", "out": "o",
                         "sparsity": {"method": "channel", **sparsity}})  # fmt: skip


def test_channel_defaults_to_the_auto_speed_target() -> None:
    assert _cfg().sparsity.speedup == DEFAULT_CHANNEL_SPEEDUP == "auto"
    assert channel_target(_cfg().sparsity) == (None, "auto")
    assert channel_target(_cfg(macs_target=0.5).sparsity) == (0.5, "macs")
    assert channel_target(_cfg(speedup=2.0).sparsity) == (0.5, "latency")
    assert channel_target(_cfg(sparsity=0.5).sparsity) == (0.5, "params")
    assert _cfg().sparsity.allocation == "latency"
    with pytest.raises(ConfigError, match="not both"):
        _cfg(speedup=2.0, macs_target=0.5)
    with pytest.raises(ConfigError, match="speedup must be > 1 or 'auto'"):
        _cfg(speedup=0.5)
    with pytest.raises(ConfigError, match="speedup must be > 1 or 'auto'"):
        _cfg(speedup="fast")
    with pytest.raises(ConfigError, match="--speedup"):
        build_config({"checkpoint": "d.pt", "data": "digits", "out": "o",
                      "sparsity": {"method": "rigl", "speedup": 2.0}})  # fmt: skip


@pytest.mark.parametrize("score", ["mahalanobis++", "knn", "msp"])
def test_candidates_are_timed_inside_the_deployed_rejector(
    monkeypatch: pytest.MonkeyPatch, score: str
) -> None:
    # compress's search times each network wrapped as the exported file wraps it: a
    # feature score's matrix products over the candidate's own (pruned) feature width
    from moonprune.exporters.rejector import RejectingClassifier

    from moonprune.distributed import DistContext
    from moonprune.reliability.features import collect_features
    from moonprune.sparsity.channel import training

    model, x, head = _resnet(width=32)
    seen: list[nn.Module] = []

    def base(dense: nn.Module, nets: Mapping[str, nn.Module], example: torch.Tensor,
             batches: tuple[int, ...], _threads: int) -> dict[str, dict[int, float]]:  # fmt: skip
        seen.extend([dense, *nets.values()])
        return {n: {b: 2.0 for b in batches} for n in nets}

    monkeypatch.setattr(training, "measure_speedups", base)
    cfg = build_config({"checkpoint": "d.pt", "data": "digits", "out": "o", "score": score,
                        "feature_bank": 300, "knn_k": 5,
                        "sparsity": {"method": "channel"}})  # fmt: skip
    training._make_pruner(model, x, head, cfg, 3, DistContext(), None, n_train=120)
    assert len(seen) > 2
    for wrapper in seen:
        assert isinstance(wrapper, RejectingClassifier) and wrapper.score == score
        assert wrapper.num_known == 5  # the unknown column is not a class
        scorer = wrapper.feature_score
        if score == "msp":
            assert scorer is None
            continue
        assert scorer is not None
        _, features = collect_features(wrapper.classifier, x, head)
        width = features.shape[1]
        if score == "knn":  # min(training rows, --feature-bank) rows; k as configured
            assert scorer.bank.shape == (120, width) and scorer.k == 5
        else:
            assert scorer.unit_means.shape == (5, width)
            assert scorer.unit_whitening.shape == (width, width)
        outputs = wrapper(x)
        assert bool(torch.isfinite(outputs[2]).all())  # the score runs


def test_netadapt_proposals_narrow_one_layer_group_by_one_grid_step() -> None:
    from moonprune.sparsity.channel.search import _Search

    model, x, head = _resnet(width=32)
    dense_macs = count_macs_params(model, x[:1])[0]

    def fraction(net: nn.Module) -> tuple[float, float]:
        return count_macs_params(net, x[:1])[0] / dense_macs, 1.0

    search = _Search(model, x, head, fraction, 64, 1, MacTimer())
    base = search.prune(16, (0.8,), "macs")[0]
    built = []
    build = search.build
    search.build = lambda c: built.append(c) or build(c)  # type: ignore[method-assign]
    proposals = search.narrowed(base)
    # each group built once: the networks every layer narrowed on its own would give,
    # from fewer builds than there are layers to narrow (a residual chain is one group)
    narrowable = [n for n, w in base.widths.items() if n != head and w > 16]
    naive = {tuple(layer_widths(build(replace(base, widths={**base.widths, n: cut}))).items())
             for n in narrowable for cut in [(base.widths[n] - 1) // 16 * 16]}  # fmt: skip
    naive.discard(tuple(base.widths.items()))
    assert {tuple(p.widths.items()) for p in proposals} == naive
    assert len(built) == len(proposals) < len(narrowable)
    assert len(proposals) >= 3  # the stem/residual group and each block's inner conv
    assert len({tuple(p.widths.items()) for p in proposals}) == len(proposals)
    for p in proposals:
        changed = {n: (base.widths[n], w) for n, w in p.widths.items() if w != base.widths[n]}
        assert changed and head not in changed
        assert len(set(changed.values())) == 1  # one group: every member the same cut
        old, new = next(iter(changed.values()))
        assert new == (old - 1) // 16 * 16 and new >= 16
        assert p.macs_fraction < base.macs_fraction and p.grid == 16


def test_netadapt_proposals_start_from_the_fastest_candidate_short_of_the_target() -> None:
    from moonprune.sparsity.channel.search import _neighbours

    def cand(b1: float, b64: float, w: int) -> Candidate:
        return Candidate(16, w / 64, w / 64, {"conv": w}, {1: b1, 64: b64})

    @dataclass
    class Search:
        batch: int = 64
        bases: list[Candidate] = field(default_factory=list)

        def narrowed(self, base: Candidate) -> list[Candidate]:
            self.bases.append(base)
            return [cand(0.0, 0.0, base.widths["conv"] - 16), cand(0.0, 0.0, 16)]

    search = Search()
    found = [cand(1.3, 1.5, 64), cand(1.4, 1.76, 48), cand(1.9, 2.56, 16)]
    made = _neighbours(search, found, 2.0)  # type: ignore[arg-type]
    assert search.bases == [found[1]] and [c.widths["conv"] for c in made] == [32]
    # the nearest slower one is slower than dense at batch 1: the next one is the base
    found[1] = cand(1.0, 1.76, 48)
    _neighbours(search, found, 2.0)  # type: ignore[arg-type]
    assert search.bases[-1] == found[0]
    # a candidate within AIM already: nothing proposed
    assert _neighbours(search, [*found, cand(1.5, 2.05, 24)], 2.0) == []  # type: ignore[arg-type]
    assert len(search.bases) == 2


def test_netadapt_rounds_continue_from_the_best_proposal_until_one_is_near_the_target() -> None:
    """NetAdapt iterates: each round starts from the fastest proposal still short of the
    target, and the search stops once one lies within AIM (half the tolerance: a plan at
    the tolerance's edge gave a deployed file outside it)."""
    from moonprune.sparsity.channel.search import AIM, NETADAPT_ROUNDS, _close_in

    def cand(w: int, speed: float = 0.0) -> Candidate:
        return Candidate(16, w / 64, w / 64, {"conv": w}, {1: 1.2, 64: speed})

    @dataclass
    class Search:  # speed-up 64 / width; no bracket can be bisected
        step: int
        batch: int = 64
        bases: list[int] = field(default_factory=list)

        def prune(self, _grid: int, _fractions: tuple[float, ...], _m: str) -> list[Candidate]:
            return []

        def narrowed(self, base: Candidate) -> list[Candidate]:
            self.bases.append(base.widths["conv"])
            return [cand(base.widths["conv"] - self.step)]

        def time(self, made: list[Candidate]) -> list[Candidate]:
            return [cand(c.widths["conv"], 64 / c.widths["conv"]) for c in made]

    start = [cand(64, 1.0), cand(38, 64 / 38), cand(16, 4.0)]
    search = Search(step=3)  # 35: 1.83x (within TOLERANCE, not AIM); then 32: 2.0x
    found = _close_in(search, start, 2.0)  # type: ignore[arg-type]
    assert search.bases == [38, 35] and [c.widths["conv"] for c in found[3:]] == [35, 32]
    assert AIM * 2.0 < abs(64 / 35 - 2.0) <= TOLERANCE * 2.0
    assert choose(found, Target("speedup", 2.0), 64).widths == {"conv": 32}
    # a proposal that timing noise rates below its base still leads the next round
    noisy = Search(step=3)
    noisy.time = lambda made: [cand(c.widths["conv"], {35: 1.6, 32: 2.0}[c.widths["conv"]])
                               for c in made]  # type: ignore[method-assign]  # fmt: skip
    found = _close_in(noisy, start, 2.0)  # type: ignore[arg-type]
    assert noisy.bases == [38, 35] and found[-1].speedup[64] == 2.0
    # a target never approached stops after NETADAPT_ROUNDS rounds
    slow = Search(step=1)
    _close_in(slow, start, 2.0)  # type: ignore[arg-type]
    assert slow.bases == [38, 37, 36][:NETADAPT_ROUNDS] and NETADAPT_ROUNDS == 3
