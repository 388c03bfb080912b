"""Feature-space OOD scores (issue 17): known answers, the graph, the checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from moonprune.assessment import collect
from moonprune.checkpoints import checkpoint_from_dict
from moonprune.config import CompressConfig
from moonprune.errors import CheckpointError, ConfigError
from moonprune.reliability.features import (
    FeatureScore,
    FeatureStats,
    fit_feature_stats,
    knn,
    mahalanobis,
)
from moonprune.reliability.scores import check_score, get_score


def _two_blobs(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D features: class 0 around (0, 0), class 1 around (4, 0); sd 2 along x, 1 along y."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    f = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    return f + torch.stack([4.0 * y, 0 * y], dim=1), y


def test_mahalanobis_hand_formula() -> None:
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    precision = torch.diag(torch.tensor([1 / 4, 1.0]))  # covariance diag(4, 1)
    whitening = torch.linalg.cholesky(precision)
    x = torch.tensor([[1.0, 1.0], [4.0, -2.0], [2.0, 0.0]])
    # (1, 1): 1/4 + 1 = 1.25 to class 0 and 9/4 + 1 = 3.25 to class 1;
    # (4, -2): 0 + 4 = 4 to class 1; (2, 0): 4/4 = 1 to either class
    got = mahalanobis(x, means, whitening)
    assert torch.allclose(got, torch.tensor([-1.25, -4.0, -1.0]))


def test_mahalanobis_fit_matches_sklearn() -> None:
    f, y = _two_blobs()
    stats = fit_feature_stats(f, y, 2)
    means = torch.stack([f[y == 0].mean(0), f[y == 1].mean(0)])
    assert torch.allclose(stats.means.double(), means, atol=1e-6)
    lw = LedoitWolf(assume_centered=True).fit((f - means[y]).numpy())
    precision = (stats.whitening.double() @ stats.whitening.double().T).numpy()
    assert np.allclose(precision, lw.precision_, rtol=1e-5)
    x = torch.tensor([[1.0, 1.0], [10.0, 5.0], [4.0, -0.5]])
    expected = -np.min(
        [lw.mahalanobis(x.numpy() - means[c].numpy()) for c in range(2)], axis=0
    )  # sklearn's squared distance with its own precision
    assert np.allclose(FeatureScore("mahalanobis", stats)(x).numpy(), expected, rtol=1e-4)
    # the shrunk covariance is close to the true diag(4, 1)
    assert np.allclose(np.diag(lw.covariance_), [4.0, 1.0], rtol=0.2)


def test_knn_hand_formula_and_sklearn() -> None:
    angles = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0, 2.0])
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    x = torch.tensor([[3.0, 0.0], [0.0, -2.0]])  # angles 0 and -pi/2
    # nearest angles to 0: 0, 0.1, 0.3 -> 3rd is cos(0.3); to -pi/2: 0, 0.1, 0.3 -> cos(pi/2+0.3)
    got = knn(x, bank, k=3)
    expected = torch.tensor([math.cos(0.3), math.cos(math.pi / 2 + 0.3)])
    assert torch.allclose(got, expected, atol=1e-6)
    nn_ = NearestNeighbors(n_neighbors=3, metric="cosine").fit(bank.numpy())
    distances, _ = nn_.kneighbors(x.numpy())
    assert np.allclose(got.numpy(), 1 - distances[:, -1], atol=1e-6)


def test_bank_is_bounded_stratified_and_unit() -> None:
    f = torch.randn(100, 5, generator=torch.Generator().manual_seed(1))
    y = (torch.arange(100) >= 70).long()  # 70 of class 0, 30 of class 1
    stats = fit_feature_stats(f, y, 2, bank_size=10, k=3, seed=0)
    assert stats.bank.shape == (10, 5)
    assert torch.allclose(stats.bank.norm(dim=1), torch.ones(10), atol=1e-6)
    units = f / f.norm(dim=1, keepdim=True)
    rows = [int((units - b).norm(dim=1).argmin()) for b in stats.bank]
    assert sum(r >= 70 for r in rows) == 3  # proportional: 7 + 3
    again = fit_feature_stats(f, y, 2, bank_size=10, k=3, seed=0)
    assert torch.equal(stats.bank, again.bank)
    with pytest.raises(ConfigError, match="knn_k = 20 exceeds the 10"):
        fit_feature_stats(f, y, 2, bank_size=10, k=20)


def test_scores_separate_far_inputs() -> None:
    f, y = _two_blobs()
    stats = fit_feature_stats(f, y, 2, k=5)
    near, far = torch.tensor([[0.5, 0.2], [4.2, -0.3]]), torch.tensor([[40.0, 30.0], [-30.0, 20.0]])
    for name in ("mahalanobis", "mahalanobis++", "knn"):
        score = FeatureScore(name, stats)
        assert score(near).min() > score(far).max(), name


def test_score_names_and_errors() -> None:
    assert check_score("knn") == "knn"
    with pytest.raises(ConfigError, match=r"mahalanobis, mahalanobis\+\+, knn"):
        check_score("mahalanobs")
    with pytest.raises(ConfigError, match="reads the classifier's input features"):
        get_score("knn")
    with pytest.raises(ConfigError, match="knn_k"):
        CompressConfig(checkpoint="d.pt", data="digits", out="o", knn_k=50, feature_bank=20)


def test_stats_round_trip_and_damage() -> None:
    f, y = _two_blobs(60)
    stats = fit_feature_stats(f, y, 2, bank_size=20, k=4)
    record = stats.to_dict()
    assert all(isinstance(v, torch.Tensor) for v in record.values())
    back = FeatureStats.from_dict(record, "m.pt")
    assert back.k == 4 and torch.equal(back.bank, stats.bank)
    assert torch.equal(back.whitening, stats.whitening)
    for bad in ({**record, "k": torch.tensor(99)}, {**record, "means": torch.zeros(2, 3)},
                {**record, "bank": record["bank"] * float("nan")}, {"means": 1}):  # fmt: skip
        with pytest.raises(CheckpointError, match=r"m\.pt"):
            FeatureStats.from_dict(bad, "m.pt")
    assert stats.nbytes("knn") == 4 * 20 * 2 and stats.nbytes("mahalanobis") == 4 * (4 + 4)
    assert stats.nbytes("mahalanobis++") == 4 * (4 + 4) and stats.nbytes("msp") == 0
    assert back.unit_whitening is not None and stats.unit_whitening is not None
    assert torch.equal(back.unit_whitening, stats.unit_whitening)
    unit = {k: v for k, v in record.items() if k.startswith("unit_")}
    with pytest.raises(CheckpointError, match=r"m\.pt"):  # a damaged normalised part
        FeatureStats.from_dict({**record, "unit_means": unit["unit_means"][:1]}, "m.pt")
    # statistics saved before mahalanobis++ existed load, and refuse only that score
    old = FeatureStats.from_dict({k: v for k, v in record.items() if k not in unit}, "m.pt")
    assert not old.has("mahalanobis++") and old.has("mahalanobis")
    with pytest.raises(CheckpointError, match=r"before the 'mahalanobis\+\+' score existed"):
        FeatureScore("mahalanobis++", old)


def test_mahalanobis_plus_plus_is_mahalanobis_of_unit_features() -> None:
    """Known answer: the score of f equals sklearn's Mahalanobis distance, fitted on the
    L2-normalised training rows, of f / ||f|| (Mueller and Hein 2025's recipe)."""
    from sklearn.covariance import LedoitWolf

    f, y = _two_blobs(80)
    f = f * torch.linspace(0.5, 4.0, len(f)).unsqueeze(1)  # norms that vary per row
    stats = fit_feature_stats(f, y, 2, bank_size=20, k=4)
    z = (f / f.norm(dim=1, keepdim=True)).double().numpy()
    means = np.stack([z[y.numpy() == c].mean(axis=0) for c in range(2)])
    lw = LedoitWolf(assume_centered=True).fit(z - means[y.numpy()])
    x = torch.randn(7, f.shape[1], generator=torch.Generator().manual_seed(5)) * 3
    zx = (x / x.norm(dim=1, keepdim=True)).double().numpy()
    expected = -np.min([lw.mahalanobis(zx - means[c]) for c in range(2)], axis=0)
    got = FeatureScore("mahalanobis++", stats)(x).numpy()
    assert np.allclose(got, expected, rtol=1e-4)
    # scale-free: a row and the same row times 10 score alike; plain mahalanobis differs
    assert np.allclose(FeatureScore("mahalanobis++", stats)(x * 10).numpy(), got, rtol=1e-4)
    plain = FeatureScore("mahalanobis", stats)
    assert not np.allclose(plain(x * 10).numpy(), plain(x).numpy(), rtol=1e-2)


def test_collect_fits_on_the_training_split_in_eval_mode(digits06) -> None:
    from moonprune.models import resnet8

    model = resnet8(num_classes=6, width=4, in_channels=1).train()
    logits = collect(model, digits06, {})
    assert model.training  # the flag is restored
    assert logits.features is not None
    stats = logits.features.stats
    assert stats.bank.shape == (len(digits06.train), 16)  # fewer rows than the bank's 2000

    def fc_input(x: torch.Tensor) -> torch.Tensor:
        seen = []
        handle = model.fc.register_forward_hook(lambda _m, i, _o: seen.append(i[0]))
        model.eval()
        with torch.no_grad():
            model(x)
        handle.remove()
        model.train()
        return seen[0]

    expected = fit_feature_stats(fc_input(digits06.train.x), digits06.train.y, 6)
    assert torch.allclose(stats.means, expected.means, atol=1e-5)
    assert torch.allclose(stats.bank, expected.bank, atol=1e-5)
    scores = logits.features.values["knn"]["id_test"]
    reference = knn(fc_input(digits06.test.x), stats.bank, stats.k).double().numpy()
    assert np.allclose(scores, reference, atol=1e-5)


def test_checkpoint_without_stats_loads_and_damaged_stats_refused(tmp_path) -> None:
    from moonprune.checkpoints import ArchSpec, MoonpruneCheckpoint, RunRecord
    from moonprune.data import Preprocessing
    from moonprune.models import demo_cnn

    ckpt = MoonpruneCheckpoint(
        model=demo_cnn(num_classes=2, width=4),
        arch=ArchSpec("moonprune.models:demo_cnn", {"num_classes": 2, "width": 4}),
        classes=("a", "b"), run=RunRecord(Preprocessing(1, 8, 8, 1.0, (0.0,), (1.0,))),
    )  # fmt: skip
    old = ckpt.to_dict()
    del old["feature_stats"]  # written before issue 17
    assert checkpoint_from_dict(old, "old.pt").feature_stats is None
    f, y = _two_blobs(40)
    stats = fit_feature_stats(f, y, 2, bank_size=10, k=2)
    new = {**old, "feature_stats": stats.to_dict()}
    assert torch.equal(checkpoint_from_dict(new, "new.pt").feature_stats.means, stats.means)
    three = fit_feature_stats(f, torch.arange(40) % 3, 3, bank_size=10, k=2)
    with pytest.raises(CheckpointError, match="3 class means for 2 classes"):
        checkpoint_from_dict({**old, "feature_stats": three.to_dict()}, "bad.pt")
    with pytest.raises(CheckpointError, match="not a finite value"):
        run = {**old["run"], "score": "mahalanobis", "threshold": 3.0}
        checkpoint_from_dict({**old, "run": run}, "bad.pt")
