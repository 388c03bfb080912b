"""Reliability metrics: against scikit-learn on random data, against known answers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from moonprune.errors import ConfigError, DataError
from moonprune.reliability import (
    EvalOptions,
    OODMetrics,
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    bootstrap_ci,
    calibrate_threshold,
    collect_logits,
    evaluate_logits,
    expected_calibration_error,
    fpr_at_tpr,
    negative_log_likelihood,
    ood_metrics,
)


def _random_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping ID / OOD scores, rounded to one decimal so many values tie."""
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(5, 300, size=2)
    id_scores = np.round(rng.normal(0.8, 1.0, n_id), 1)
    ood_scores = np.round(rng.normal(0.0, 1.0, n_ood), 1)
    return id_scores, ood_scores


def _labelled(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.ones(id_scores.size), np.zeros(ood_scores.size)]
    return y, np.r_[id_scores, ood_scores]


# --- AUROC / AUPR against scikit-learn ---------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_auroc_and_aupr_equal_sklearn_with_ties(seed: int) -> None:
    id_scores, ood_scores = _random_scores(seed)
    y, s = _labelled(id_scores, ood_scores)
    assert auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert aupr_out(id_scores, ood_scores) == pytest.approx(
        average_precision_score(1 - y, -s), abs=1e-12
    )


def test_aupr_on_integer_scores_with_heavy_ties_equals_sklearn() -> None:
    rng = np.random.default_rng(42)
    id_scores = rng.integers(0, 4, 50).astype(float)
    ood_scores = rng.integers(0, 3, 70).astype(float)
    y, s = _labelled(id_scores, ood_scores)
    assert aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(y, s))
    assert aupr_out(id_scores, ood_scores) == pytest.approx(average_precision_score(1 - y, -s))
    assert auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(y, s))


def test_auroc_known_answers() -> None:
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    # pairs (id > ood) + 0.5 * ties: (3 > 1, 3 > 2) + (2 > 1, 2 == 2) = 3.5 of 4
    assert auroc([3.0, 2.0], [1.0, 2.0]) == 3.5 / 4


# --- threshold and FPR at TPR --------------------------------------------------------

ID_1_TO_20 = np.arange(1.0, 21.0)


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "tpr", "threshold", "fpr"),
    [
        # 19 of 20 accepted from 2 down: t halfway to 1; FPR at the ROC point 2: {2, 3, 25}
        (ID_1_TO_20, [0.0, 1.0, 1.5, 2.0, 3.0, 25.0], 0.95, 1.5, 3 / 6),
        # ceil(0.95 * 10) = 10: all of ID, nothing lower, t = 1; OOD >= 1: {1, 2}
        (np.arange(1.0, 11.0), [0.5, 1.0, 2.0], 0.95, 1.0, 2 / 3),
        # 9 of 10 from 2 down: t = 1.5; OOD >= 2: {2}
        (np.arange(1.0, 11.0), [0.5, 1.0, 2.0], 0.9, 1.5, 1 / 3),
        # ties at the boundary: every ID score is 5, OOD 5 accepted, 4 not
        ([5.0, 5.0, 5.0, 5.0], [5.0, 4.0], 0.95, 5.0, 0.5),
        # tpr = 1 accepts the lowest ID score, nothing lies below it
        ([0.3, 0.9, 0.6], [0.2, 0.3, 0.95], 1.0, 0.3, 2 / 3),
        # tpr = 0.5 of 4: the 2nd largest (3), t halfway to 2
        ([4.0, 3.0, 2.0, 1.0], [3.0, 2.5, 0.0, 5.0], 0.5, 2.5, 2 / 4),
        # ties below the boundary: halfway to the largest lower score, not the lowest
        ([4.0, 3.0, 1.0, 1.0], [2.5, 2.0], 0.5, 2.0, 0.0),
    ],
)
def test_fpr_at_tpr_known_answers(
    id_scores: Any, ood_scores: Any, tpr: float, threshold: float, fpr: float
) -> None:
    assert calibrate_threshold(id_scores, tpr) == threshold
    assert fpr_at_tpr(id_scores, ood_scores, tpr) == pytest.approx(fpr)


def test_threshold_count_is_exact_in_floating_point() -> None:
    # 0.07 * 100 = 7.000000000000001: a bare ceil() would demand 8 of 100 (t = 91.5).
    assert calibrate_threshold(np.arange(100.0), 0.07) == 92.5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tpr", [0.5, 0.9, 0.95, 0.99])
def test_calibrate_threshold_accepts_tpr_and_is_tight(seed: int, tpr: float) -> None:
    scores, _ = _random_scores(seed)
    threshold = calibrate_threshold(scores, tpr)
    accepted = scores[scores >= threshold]
    assert accepted.size / scores.size >= tpr
    # tight: dropping the lowest accepted value (with its ties) accepts too few
    assert np.mean(scores > accepted.min()) < tpr
    below = scores[scores < threshold]
    if below.size:
        # a margin on both sides: halfway between the two ID scores around it
        assert threshold == pytest.approx((accepted.min() + below.max()) / 2, abs=1e-12)
        assert below.max() < threshold < accepted.min()


@pytest.mark.parametrize("seed", range(4))
def test_threshold_survives_float32_noise_in_the_scores(seed: int) -> None:
    """A runtime recomputing the scores in float32 (onnxruntime vs PyTorch) differs by an
    ulp or so; the validation inputs it accepts must not change (they did when the
    threshold was itself a validation score)."""
    rng = np.random.default_rng(seed)
    scores = rng.random(400).astype(np.float32)
    threshold = calibrate_threshold(scores.astype(np.float64), 0.95)
    accepted = scores >= np.float32(threshold)  # the graph holds a float32 threshold
    assert accepted.mean() >= 0.95
    for nudge in (-1, 1):
        noisy = np.nextafter(scores, np.float32(nudge * np.inf))
        assert np.array_equal(noisy >= np.float32(threshold), accepted)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tpr", [0.8, 0.95])
def test_fpr_at_tpr_equals_sklearn_roc_curve(seed: int, tpr: float) -> None:
    """FPR at the first ROC point (highest threshold) whose TPR reaches ``tpr``."""
    from sklearn.metrics import roc_curve

    id_scores, ood_scores = _random_scores(seed)
    if seed % 2:  # continuous scores too, not only the rounded ones with ties
        rng = np.random.default_rng(seed)
        id_scores = rng.normal(0.8, 1.0, id_scores.size)
        ood_scores = rng.normal(0.0, 1.0, ood_scores.size)
    y, s = _labelled(id_scores, ood_scores)
    fpr, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    expected = fpr[np.flatnonzero(tprs >= tpr)[0]]
    assert fpr_at_tpr(id_scores, ood_scores, tpr) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, math.nan])
def test_bad_tpr_is_a_config_error(tpr: float) -> None:
    with pytest.raises(ConfigError, match="tpr"):
        calibrate_threshold([0.1, 0.2], tpr)


# --- ECE, NLL, accuracy ------------------------------------------------------------

# 9 predictions; bins are (lo, hi] with 0 in the first bin.
ECE_CONF = [0.0, 0.05, 0.2, 0.21, 0.25, 0.3, 0.6, 0.62, 1.0]
ECE_HITS = [1, 0, 1, 0, 1, 0, 1, 0, 1]


def test_ece_known_answer_15_bins() -> None:
    # sum over bins of |sum(correct - confidence)|:
    # [0, 1/15] {0, .05}: |1 - .05| = .95;  (2/15, 3/15] {.2}: .8
    # (3/15, 4/15] {.21, .25}: |1 - .46| = .54;  (4/15, 5/15] {.3}: .3
    # (8/15, 9/15] {.6}: .4;  (9/15, 10/15] {.62}: .62;  (14/15, 1] {1}: 0
    expected = (0.95 + 0.8 + 0.54 + 0.3 + 0.4 + 0.62) / 9
    assert expected_calibration_error(ECE_CONF, ECE_HITS) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(ECE_CONF, ECE_HITS, n_bins=15) == pytest.approx(expected)


def test_ece_known_answer_10_bins() -> None:
    # [0, .1] {0, .05}: .95;  (.1, .2] {.2}: .8
    # (.2, .3] {.21, .25, .3} with correct 0, 1, 0: |1 - .76| = .24
    # (.5, .6] {.6}: .4;  (.6, .7] {.62}: .62;  (.9, 1] {1}: 0
    expected = (0.95 + 0.8 + 0.24 + 0.4 + 0.62) / 9
    assert expected_calibration_error(ECE_CONF, ECE_HITS, n_bins=10) == pytest.approx(
        expected, abs=1e-12
    )


def test_ece_is_zero_when_calibrated_and_one_bin_is_global_gap() -> None:
    assert expected_calibration_error([0.5, 0.5], [True, False]) == 0.0
    assert expected_calibration_error([0.9, 0.7, 0.2], [1, 1, 1], n_bins=1) == pytest.approx(0.4)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_ece_bad_bins(n_bins: Any) -> None:
    with pytest.raises(ConfigError, match="n_bins"):
        expected_calibration_error([0.5], [1], n_bins=n_bins)


def test_ece_rejects_logits_as_confidences() -> None:
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        expected_calibration_error([0.5, 3.0], [1, 0])


def test_nll_known_answer_and_clipping() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    nll = negative_log_likelihood(probs, [0, 2, 1])
    assert nll == pytest.approx(-(math.log(0.7) + math.log(0.5) + math.log(1e-12)) / 3)


def test_nll_label_out_of_range() -> None:
    with pytest.raises(DataError, match="labels"):
        negative_log_likelihood([[0.5, 0.5]], [2])


def test_accuracy_known_answer() -> None:
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    with pytest.raises(DataError, match="differ in length"):
        accuracy([0, 1], [0])


# --- input validation ------------------------------------------------------------

NAN = [0.1, math.nan, 0.3]
OK = [0.2, 0.4]


@pytest.mark.parametrize(
    "call",
    [
        lambda: auroc(NAN, OK),
        lambda: auroc(OK, NAN),
        lambda: aupr_in(NAN, OK),
        lambda: aupr_out(OK, NAN),
        lambda: fpr_at_tpr(OK, NAN),
        lambda: calibrate_threshold(NAN),
        lambda: ood_metrics(NAN, OK),
        lambda: expected_calibration_error(NAN, [1, 0, 1]),
        lambda: negative_log_likelihood([[0.5, math.nan]], [0]),
        lambda: bootstrap_ci(NAN, OK, auroc),
    ],
)
def test_nan_is_a_data_error(call: Callable[[], object]) -> None:
    with pytest.raises(DataError, match="NaN"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: auroc([], OK),
        lambda: auroc(OK, []),
        lambda: aupr_in(OK, []),
        lambda: accuracy([], []),
    ],
)
def test_empty_is_a_data_error(call: Callable[[], object]) -> None:
    with pytest.raises(DataError, match="empty"):
        call()


def test_two_dimensional_scores_are_rejected() -> None:
    with pytest.raises(DataError, match="1-D"):
        auroc([[0.1, 0.2]], OK)


# --- ood_metrics and bootstrap ------------------------------------------------------


def test_ood_metrics_bundles_the_four() -> None:
    id_scores, ood_scores = _random_scores(3)
    result = ood_metrics(id_scores, ood_scores, tpr=0.9)
    assert result == OODMetrics(
        auroc=auroc(id_scores, ood_scores),
        fpr95=fpr_at_tpr(id_scores, ood_scores, 0.9),
        aupr_in=aupr_in(id_scores, ood_scores),
        aupr_out=aupr_out(id_scores, ood_scores),
    )
    assert list(result.as_dict()) == ["auroc", "fpr95", "aupr_in", "aupr_out"]


def test_bootstrap_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(1.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    lo, hi = bootstrap_ci(id_scores, ood_scores, auroc, n_boot=200, seed=7)
    assert lo < auroc(id_scores, ood_scores) < hi
    assert 0.005 < hi - lo < 0.1  # about 4 standard errors of an AUROC on 2000 + 2000
    assert bootstrap_ci(id_scores, ood_scores, auroc, n_boot=200, seed=7) == (lo, hi)
    assert bootstrap_ci(id_scores, ood_scores, auroc, n_boot=200, seed=8) != (lo, hi)
    narrow = bootstrap_ci(id_scores, ood_scores, auroc, n_boot=200, seed=7, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


def test_bootstrap_resamples_each_set_with_replacement() -> None:
    id_scores, ood_scores = np.arange(10.0), np.arange(100.0, 107.0)
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def record(a: Any, b: Any) -> float:
        calls.append((np.asarray(a), np.asarray(b)))
        return float(len(calls))

    bootstrap_ci(id_scores, ood_scores, record, n_boot=25, seed=1)
    assert len(calls) == 25
    for a, b in calls:
        assert a.shape == (10,) and b.shape == (7,)
        assert np.isin(a, id_scores).all() and np.isin(b, ood_scores).all()
    # with replacement, and a fresh draw for each set in each replicate
    assert any(np.unique(a).size < a.size for a, _ in calls)
    assert any(np.unique(b).size < b.size for _, b in calls)
    assert len({a.tobytes() for a, _ in calls}) > 1
    assert len({b.tobytes() for _, b in calls}) > 1


@pytest.mark.parametrize(("kwargs", "word"), [({"n_boot": 0}, "n_boot"), ({"level": 1.0}, "level")])
def test_bootstrap_bad_options(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        bootstrap_ci(OK, OK, auroc, **kwargs)


# --- evaluate_logits / collect_logits ------------------------------------------------

# K = 2 known classes + the unknown column; each row is log(probabilities). In rows 2
# and 4 the unknown column is the largest, but a prediction is a known class.
ID_PROBS = [[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.3, 0.1, 0.6]]
ID_LABELS = [0, 0, 1, 0]
OOD_PROBS = [[0.1, 0.1, 0.8], [0.5, 0.4, 0.1]]


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    return (
        torch.tensor(ID_PROBS).log(),
        torch.tensor(ID_LABELS),
        {"far": torch.tensor(OOD_PROBS).log()},
    )


def test_evaluate_logits_hand_computed() -> None:
    id_logits, labels, ood = _hand_batch()
    result = evaluate_logits(id_logits, labels, ood, num_known=2)
    # predictions = argmax over the known columns: [0, 1, 1, 0]; 3 of 4 right
    assert result.accuracy == pytest.approx(3 / 4)
    # softmax over all 3 columns at the true label
    nll = -(math.log(0.6) + math.log(0.1) + math.log(0.7) + math.log(0.3)) / 4
    assert result.nll == pytest.approx(nll)
    # confidences .6, .2, .7, .3 each alone in one of 15 bins, correct 1, 0, 1, 1
    assert result.ece == pytest.approx((0.4 + 0.2 + 0.3 + 0.7) / 4, abs=1e-6)
    # MSP: ID {.6, .2, .7, .3} vs OOD {.1, .5}
    far = result.ood["far"]
    assert far.auroc == pytest.approx(6 / 8)
    assert far.fpr95 == pytest.approx(1 / 2)  # all 4 ID needed: t = .2 accepts OOD .5
    # descending .7 I, .6 I, .5 O, .3 I, .2 I, .1 O: sum of (recall step) * precision
    assert far.aupr_in == pytest.approx(1 / 4 + 1 / 4 + 1 / 4 * 3 / 4 + 1 / 4 * 4 / 5)
    # OOD first from the bottom: .1 O (P 1), .2 I, .3 I, .5 O (P 2/4)
    assert far.aupr_out == pytest.approx(1 / 2 + 1 / 2 * 2 / 4)


def test_evaluate_logits_passes_ece_bins_and_tpr() -> None:
    id_logits, labels, ood = _hand_batch()
    result = evaluate_logits(id_logits, labels, ood, 2, EvalOptions(ece_bins=1, tpr=0.5))
    # one bin: |accuracy - mean confidence| = |3/4 - 1.8/4|
    assert result.ece == pytest.approx(0.3, abs=1e-6)
    # 2 of 4 ID accepted at t = .6; no OOD score reaches it
    assert result.ood["far"].fpr95 == 0.0


def test_model_metrics_as_dict_is_the_report_shape() -> None:
    id_logits, labels, ood = _hand_batch()
    ood["near"] = ood["far"].flip(0)
    report = evaluate_logits(id_logits, labels, ood, num_known=2).as_dict()
    assert set(report) == {"accuracy", "ece", "nll", "ood"}
    assert set(report["ood"]) == {"far", "near"}
    for metrics in report["ood"].values():
        assert set(metrics) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
        assert all(type(v) is float for v in metrics.values())
    assert all(type(report[k]) is float for k in ("accuracy", "ece", "nll"))
    assert json.loads(json.dumps(report)) == report


def test_evaluate_logits_plain_head_uses_score_name() -> None:
    id_logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 2.5]])
    ood = {"x": torch.tensor([[0.5, 0.0], [2.8, 0.0]])}
    result = evaluate_logits(
        id_logits, torch.tensor([0, 1, 0]), ood, 2, EvalOptions(score="max_logit")
    )
    assert result.accuracy == pytest.approx(2 / 3)
    # max logit: ID {3, 1, 2.5} vs OOD {.5, 2.8}: 4 of 6 pairs (MSP would give 3.5 of 6)
    assert result.ood["x"].auroc == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"id_labels": torch.tensor([0, 2, 1, 0])}, "known classes"),
        ({"id_labels": torch.tensor([0, 1])}, "labels"),
        ({"ood_logits": {"x": torch.zeros(2, 2)}}, "columns"),
        ({"id_logits": torch.zeros(4, 5)}, "num_known"),
        ({"id_logits": torch.tensor([[0.0, 1.0, math.nan]] * 4)}, "NaN"),
    ],
)
def test_evaluate_logits_bad_inputs(change: dict[str, Any], word: str) -> None:
    id_logits, labels, ood = _hand_batch()
    kwargs: dict[str, Any] = {"id_logits": id_logits, "id_labels": labels, "ood_logits": ood}
    kwargs.update(change)
    with pytest.raises(DataError, match=word):
        evaluate_logits(**kwargs, num_known=2)


def _dropout_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_collect_logits_eval_mode_batches_and_restores_flags() -> None:
    model = _dropout_net()
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    x = torch.randn(10, 1, 2, 2)
    logits = collect_logits(model, x, batch_size=3)
    assert model.training and not model[1].training and model[2].training
    assert not logits.requires_grad
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(logits, expected)  # dropout was off during collection


def test_collect_logits_restores_flags_when_forward_fails() -> None:
    model = _dropout_net().train()
    with pytest.raises(RuntimeError):
        collect_logits(model, torch.randn(2, 1, 3, 3))  # 9 features into Linear(4, 8)
    assert all(module.training for module in model.modules())


def test_collect_logits_bad_batch_size() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        collect_logits(_dropout_net(), torch.randn(2, 1, 2, 2), batch_size=0)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"score": "msq"}, "did you mean 'msp'"),
        ({"tpr": 1.0}, "tpr"),
        ({"tpr": math.nan}, "tpr"),
        ({"tpr": "0.9"}, "tpr"),
        ({"ece_bins": 0}, "ece_bins"),
        ({"n_boot": True}, "n_boot"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_eval_options_refuse_bad_values(change: dict[str, Any], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        EvalOptions(**change)


def test_eval_options_reach_the_metrics() -> None:
    id_logits, labels, ood = _hand_batch()
    one_bin = evaluate_logits(id_logits, labels, ood, 2, EvalOptions(ece_bins=1))
    many = evaluate_logits(id_logits, labels, ood, 2, EvalOptions(ece_bins=10))
    known = torch.softmax(id_logits.double(), -1)[:, :2]
    confidence = known.amax(-1).numpy()
    correct = (known.argmax(-1) == labels).numpy()
    assert one_bin.ece == pytest.approx(abs(confidence.mean() - correct.mean()))
    assert many.ece == pytest.approx(expected_calibration_error(confidence, correct, n_bins=10))
    by_energy = evaluate_logits(id_logits, labels, ood, 2, EvalOptions(score="energy"))
    energy_scores = torch.logsumexp(id_logits[:, :2], -1).double().numpy()
    ood_energy = torch.logsumexp(next(iter(ood.values()))[:, :2], -1).double().numpy()
    name = next(iter(ood))
    assert by_energy.ood[name].auroc == pytest.approx(auroc(energy_scores, ood_energy))


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_reliability_diagram_is_binned_as_the_ece(n_bins: int) -> None:
    from moonprune.reliability.evaluation import reliability_diagram

    rng = np.random.default_rng(0)
    conf = np.concatenate([rng.uniform(0, 1, 200), [0.0, 0.2, 1.0]])
    correct = rng.uniform(0, 1, conf.size) < conf
    points = reliability_diagram(conf, correct, n_bins)
    assert sum(n for _, _, n in points) == conf.size
    from_plot = sum(n * abs(acc - c) for c, acc, n in points) / conf.size
    assert from_plot == pytest.approx(expected_calibration_error(conf, correct, n_bins))
