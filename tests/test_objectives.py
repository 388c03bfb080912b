"""The MOON loss against hand-computed values, and the schedule of ``a``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moonprune.errors import ConfigError
from moonprune.objectives import (
    MoonSchedule,
    MoonScheduleConfig,
    threshold_statistic,
    unknown_aware_loss,
    unknown_probability,
)

# K = 2 known classes + unknown (column 2).
LOGITS = torch.tensor(
    [
        [2.0, 0.0, 0.0],  # label 0: correct
        [0.0, 1.0, 0.0],  # label 0: misclassified (argmax 1)
        [0.0, 0.0, 30.0],  # label 1: misclassified, p_u = 1 in float32 -> clamped
        [1.0, 0.0, 3.0],  # label 0: right among the K known, but the unknown column wins
    ]
)
TARGET = torch.tensor([0, 0, 1, 0])


def _softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def _expected_loss(a: float) -> float:
    total = 0.0
    for row, y in zip(LOGITS.tolist(), TARGET.tolist(), strict=True):
        p = _softmax(row)
        h = -math.log(p[y])
        p_u = min(p[2], 1 - 1e-7)
        correct = max(range(3), key=lambda j: row[j]) == y
        total += h * (1.0 if correct else 1 + a / (1 + a * p_u))
    return total / len(TARGET)


@pytest.mark.parametrize("a", [0.0, 0.01, 0.5, 1.0, 3.0])
def test_loss_matches_hand_computation(a: float) -> None:
    got = unknown_aware_loss(LOGITS, TARGET, a).item()
    assert got == pytest.approx(_expected_loss(a), rel=1e-5)


def test_loss_weights_only_misclassified_rows() -> None:
    # With only the correct row, the loss is plain cross-entropy whatever a is.
    row, y = LOGITS[:1], TARGET[:1]
    assert unknown_aware_loss(row, y, 5.0).item() == pytest.approx(F.cross_entropy(row, y).item())
    # A misclassified row weighs more as a grows.
    bad, yb = LOGITS[1:2], TARGET[1:2]
    assert unknown_aware_loss(bad, yb, 2.0) > unknown_aware_loss(bad, yb, 0.5)


def test_unknown_probability_is_clamped_below_one() -> None:
    p_u = unknown_probability(LOGITS[2:3])
    assert p_u.item() < 1.0
    assert p_u.item() == pytest.approx(1 - 1e-7, abs=1e-7)


def test_weight_is_differentiated_as_computed_by_hand() -> None:
    # d(h w)/dz_j = w (p_j - [j = y]) + h dw/dz_j for misclassified rows, with
    # dw/dz_j = -a^2 / (1 + a p_u)^2 * p_u ([j = K] - p_j), and 0 where p_u is clamped
    a = 1.0
    logits = LOGITS.clone().requires_grad_(True)
    unknown_aware_loss(logits, TARGET, a).backward()
    assert logits.grad is not None
    expected = []
    for row, y in zip(LOGITS.tolist(), TARGET.tolist(), strict=True):
        p = _softmax(row)
        h = -math.log(p[y])
        correct = max(range(3), key=lambda j: row[j]) == y
        clamped = float(torch.tensor(p[2], dtype=torch.float32)) >= 1 - 1e-7
        w = 1.0 if correct else 1 + a / (1 + a * min(p[2], 1 - 1e-7))
        grad = []
        for j in range(3):
            g = w * (p[j] - (j == y))
            if not correct and not clamped:
                g += h * -(a**2) / (1 + a * p[2]) ** 2 * p[2] * ((j == 2) - p[j])
            grad.append(g / len(TARGET))
        expected.append(grad)
    assert torch.allclose(logits.grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_sum_reduction_and_an_empty_batch() -> None:
    n = len(TARGET)
    total = unknown_aware_loss(LOGITS, TARGET, 0.7, reduction="sum").item()
    assert total == pytest.approx(n * unknown_aware_loss(LOGITS, TARGET, 0.7).item())
    t_sum = threshold_statistic(LOGITS, TARGET, reduction="sum")
    assert t_sum == pytest.approx(n * threshold_statistic(LOGITS, TARGET))
    # no rows (a rank's empty shard): the sum is 0, not NaN, and still back-propagates
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = unknown_aware_loss(empty, TARGET[:0], 0.7, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None
    assert threshold_statistic(empty.detach(), TARGET[:0], reduction="sum") == 0.0


# a 4-row batch split over two "ranks" as 3/1 and as 4/0 (one rank has no rows)
@pytest.mark.parametrize("split", [3, 4])
def test_schedule_statistic_is_the_global_batch_mean(split: int) -> None:
    shards = [(LOGITS[:split], TARGET[:split]), (LOGITS[split:], TARGET[split:])]
    local = [[threshold_statistic(z, y, reduction="sum"), float(len(y))] for z, y in shards]

    def all_reduce_sum(values: list[float]) -> list[float]:  # what the all-reduce returns
        assert values in local
        return [sum(column) for column in zip(*local, strict=True)]

    config = MoonScheduleConfig(total_epochs=3, warmup_epochs=1)
    for logits, target in shards:
        schedule = MoonSchedule(config, all_reduce_sum)
        for epoch in range(2):  # warm-up (cross-entropy), then the MOON loss
            loss = schedule.loss(logits, target, epoch, reduction="sum")
            assert torch.isfinite(loss)
        t = threshold_statistic(LOGITS, TARGET)  # the whole batch's mean, seen twice
        assert schedule.ewma == pytest.approx(t, rel=1e-6)
        assert schedule.a == pytest.approx(t / 64, rel=1e-6)


def _run_schedule(
    config: MoonScheduleConfig, steps_per_epoch: int = 3
) -> tuple[list, MoonSchedule]:
    schedule = MoonSchedule(config)
    torch.manual_seed(0)
    seen = []
    for epoch in range(config.total_epochs):
        for _ in range(steps_per_epoch):
            logits = torch.randn(8, 4)
            target = torch.randint(0, 3, (8,))
            loss = schedule.loss(logits, target, epoch)
            seen.append((epoch, schedule.a, loss.item(), F.cross_entropy(logits, target).item()))
        schedule.end_epoch(epoch)
    return seen, schedule


def test_warmup_returns_plain_cross_entropy() -> None:
    seen, _ = _run_schedule(MoonScheduleConfig(total_epochs=8, warmup_epochs=3))
    for epoch, a, loss, ce in seen:
        if epoch < 3:
            assert a is None
            assert loss == pytest.approx(ce)


def test_ewma_tracks_statistic() -> None:
    schedule = MoonSchedule(MoonScheduleConfig(total_epochs=2, warmup_epochs=2))
    torch.manual_seed(1)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    expected = None
    for logits, target in batches:
        schedule.loss(logits, target, 0)
        t = threshold_statistic(logits, target)
        expected = t if expected is None else 0.05 * t + 0.95 * expected
    assert schedule.ewma == pytest.approx(expected)


def test_a_starts_at_ewma_over_init_factor_and_last_epoch_trains_at_a_final() -> None:
    # the reference (extra_c_loss.py:118-131) sets a at the first batch after warm-up and
    # adds the step at the first batch of each later epoch: the last epoch uses a_final
    config = MoonScheduleConfig(total_epochs=10, warmup_epochs=4, init_factor=64, a_final=1.0)
    schedule = MoonSchedule(config)
    torch.manual_seed(0)
    ewma: float | None = None
    a_per_epoch = []
    for epoch in range(10):
        a_in_epoch = set()
        for step in range(3):
            logits, target = torch.randn(8, 4), torch.randint(0, 3, (8,))
            t = threshold_statistic(logits, target)
            ewma = t if ewma is None else 0.05 * t + 0.95 * ewma
            schedule.loss(logits, target, epoch)
            if epoch == 4 and step == 0:
                assert schedule.a == pytest.approx(ewma / 64)
            a_in_epoch.add(schedule.a)
        assert len(a_in_epoch) == 1  # a is constant within an epoch
        a_per_epoch.append(schedule.a)
        schedule.end_epoch(epoch)
    assert a_per_epoch[:4] == [None] * 4
    assert a_per_epoch[-1] == 1.0  # exactly a_final
    assert schedule.a_for(9) == 1.0 and schedule.a_for(4) == a_per_epoch[4]
    # a grows by the same step each epoch after warm-up: (a_final - a0) / (10 - 1 - 4)
    ramp = [a for a in a_per_epoch[4:] if a is not None]
    diffs = [b - a for a, b in itertools.pairwise(ramp)]
    assert len(diffs) == 5
    assert diffs[0] == pytest.approx((1.0 - ramp[0]) / 5)
    assert all(d == pytest.approx(diffs[0]) for d in diffs)
    assert schedule.a_step == pytest.approx(diffs[0])


def test_epochs_equal_to_warmup_never_divides_by_zero() -> None:
    seen, schedule = _run_schedule(MoonScheduleConfig(total_epochs=5, warmup_epochs=5))
    assert schedule.a is None
    assert all(loss == pytest.approx(ce) for _, _, loss, ce in seen)


def test_last_epoch_alone_after_warmup() -> None:
    # one epoch after warm-up: it trains at ewma / init_factor, as in the reference (whose
    # step (a_final - a) / (total - epoch) divides by zero there, and is never used)
    seen, schedule = _run_schedule(MoonScheduleConfig(total_epochs=5, warmup_epochs=4))
    assert schedule.ewma is not None
    assert schedule.a == seen[-1][1]
    assert schedule.a_step == 0.0
    assert schedule.a is not None and schedule.a < 0.1


def test_state_dict_round_trip() -> None:
    _, schedule = _run_schedule(MoonScheduleConfig(total_epochs=6, warmup_epochs=2))
    clone = MoonSchedule(schedule.config)
    clone.load_state_dict(schedule.state_dict())
    assert (clone.ewma, clone.a, clone.a_step) == (schedule.ewma, schedule.a, schedule.a_step)
    assert [clone.a_for(e) for e in range(6)] == [schedule.a_for(e) for e in range(6)]


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ConfigError):
        MoonScheduleConfig(total_epochs=0)
    with pytest.raises(ConfigError):
        MoonScheduleConfig(total_epochs=3, init_factor=0)


# -- the gradient through the weight, against the reference formula -------------------
def _reference_loss(logits: torch.Tensor, target: torch.Tensor, a: float) -> torch.Tensor:
    """The reference's loss written out (StevenBoys/MOON, openood/losses/extra_c_loss.py,
    lines 83-102 and 133-134): only ``correct`` and ``a`` are constants."""
    h_c = F.nll_loss(F.log_softmax(logits, dim=1), target, reduction="none")
    p_out_abstain = torch.exp(F.log_softmax(logits, dim=1))[:, -1]
    _, pred = logits.topk(1, 1, True, True)
    correct = pred.t().eq(target.reshape(1, -1)).float().view(-1)
    p_out_abstain = torch.min(p_out_abstain, torch.tensor([1.0 - 1e-7]))
    alpha = torch.tensor([a])
    bound = (1 + alpha * 1 / (1 + alpha * p_out_abstain)) * (1 - correct) + correct
    return (h_c * bound).mean()


@pytest.mark.parametrize("a", [0.01, 0.3, 1.0, 4.0])
def test_gradient_equals_autograd_on_the_reference_formula(a: float) -> None:
    g = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(64, 6, generator=g)
    target = torch.randint(0, 5, (64,), generator=g)
    correct = logits.argmax(dim=1) == target
    assert 0 < int(correct.sum()) < 64  # both kinds of rows
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    unknown_aware_loss(ours, target, a).backward()
    _reference_loss(ref, target, a).backward()
    assert ours.grad is not None and ref.grad is not None
    assert torch.allclose(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)
    # the weight's own gradient counts: a detached weight gives another gradient
    detached = _detached_weight_grad(logits, target, a)
    assert torch.allclose(ours.grad[correct], detached[correct], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours.grad[~correct], detached[~correct], rtol=1e-5, atol=1e-7)


def _detached_weight_grad(logits: torch.Tensor, target: torch.Tensor, a: float) -> torch.Tensor:
    x = logits.clone().requires_grad_(True)
    h = F.cross_entropy(x, target, reduction="none")
    with torch.no_grad():
        p_u = torch.softmax(x, 1)[:, -1]
        w = torch.where(x.argmax(1) == target, 1.0, 1 + a / (1 + a * p_u))
    (h * w).mean().backward()
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_unknown_logit_rises_for_a_badly_misclassified_row(a: float) -> None:
    # label 0, class 1 wins by a margin giving h = 2 (1 + a) / a^2 > (1 + a) / a^2;
    # p_u is small, so dL/dz_u ~ p_u (1 + a - a^2 h) < 0: gradient descent raises z_u
    h_target = 2 * (1 + a) / a**2
    logits = torch.tensor([[0.0, h_target, -4.0]], requires_grad=True)
    target = torch.tensor([0])
    unknown_aware_loss(logits, target, a).backward()
    assert logits.grad is not None
    assert logits.grad[0, 2] < 0


def test_unknown_logit_falls_for_a_mildly_misclassified_row() -> None:
    # a = 0.5: (1 + a) / a^2 = 6 > h = 1.31, so the unknown logit is pushed down
    logits = torch.tensor([[0.0, 1.0, -4.0]], requires_grad=True)
    unknown_aware_loss(logits, torch.tensor([0]), 0.5).backward()
    assert logits.grad is not None and logits.grad[0, 2] > 0
