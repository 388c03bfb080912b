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


def test_weight_is_not_differentiated() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    unknown_aware_loss(logits, TARGET, 1.0).backward()
    # gradient equals that of sum(w * h)/N with w treated as constants
    p = torch.softmax(LOGITS, 1)
    p_u = p[:, 2].clamp(max=1 - 1e-7)
    w = torch.tensor([1.0, *(1 + 1 / (1 + p_u[i].item()) for i in (1, 2, 3))])
    ref = LOGITS.clone().requires_grad_(True)
    (F.cross_entropy(ref, TARGET, reduction="none") * w).mean().backward()
    assert ref.grad is not None and logits.grad is not None
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6)


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


def test_a_starts_at_ewma_over_init_factor_and_reaches_a_final() -> None:
    config = MoonScheduleConfig(total_epochs=10, warmup_epochs=4, init_factor=64, a_final=1.0)
    schedule = MoonSchedule(config)
    torch.manual_seed(0)
    ewma: float | None = None
    a_per_epoch = []
    for epoch in range(10):
        for step in range(3):
            logits, target = torch.randn(8, 4), torch.randint(0, 3, (8,))
            t = threshold_statistic(logits, target)
            ewma = t if ewma is None else 0.05 * t + 0.95 * ewma
            schedule.loss(logits, target, epoch)
            if epoch == 4 and step == 0:
                assert schedule.a == pytest.approx(ewma / 64)
        a_per_epoch.append(schedule.a)
        schedule.end_epoch(epoch)
    assert schedule.a == pytest.approx(1.0)
    # a grows by the same step each epoch after warm-up: (a_final - a0) / (10 - 4)
    diffs = [b - a for a, b in itertools.pairwise(a_per_epoch[4:])]
    assert diffs[0] == pytest.approx((1.0 - a_per_epoch[4]) / 6)
    assert all(d == pytest.approx(diffs[0]) for d in diffs)


def test_epochs_equal_to_warmup_never_divides_by_zero() -> None:
    seen, schedule = _run_schedule(MoonScheduleConfig(total_epochs=5, warmup_epochs=5))
    assert schedule.a is None
    assert all(loss == pytest.approx(ce) for _, _, loss, ce in seen)


def test_last_epoch_alone_after_warmup() -> None:
    _, schedule = _run_schedule(MoonScheduleConfig(total_epochs=5, warmup_epochs=4))
    assert schedule.a == pytest.approx(1.0)


def test_state_dict_round_trip() -> None:
    _, schedule = _run_schedule(MoonScheduleConfig(total_epochs=6, warmup_epochs=2))
    clone = MoonSchedule(schedule.config)
    clone.load_state_dict(schedule.state_dict())
    assert (clone.ewma, clone.a, clone.a_step) == (schedule.ewma, schedule.a, schedule.a_step)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ConfigError):
        MoonScheduleConfig(total_epochs=0)
    with pytest.raises(ConfigError):
        MoonScheduleConfig(total_epochs=3, init_factor=0)
