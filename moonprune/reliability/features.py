"""Feature-space OOD scores: Mahalanobis and KNN on the classifier's input.

The *features* are the input of the final classifier layer
(:func:`moonprune.heads.find_classifier`): ``f`` of shape ``(N, D)`` (the penultimate
activations). Statistics are fitted once, on the ID training split of the *final*
model in eval mode (:func:`fit_feature_stats`), and stored with the model; both
scores are "higher = more in-distribution", like every score in
:mod:`moonprune.reliability.scores`.

``mahalanobis``
    ``-min_c (f - mu_c)^T P (f - mu_c)``: class means ``mu`` ``(K, D)`` and one shared
    precision ``P = Sigma^-1`` of the class-centred training features, ``Sigma``
    shrunk by Ledoit-Wolf (:class:`sklearn.covariance.LedoitWolf`). Stored as a
    whitening matrix ``W`` ``(D, D)`` with ``P = W W^T`` (Cholesky), so the distance
    is ``||(f - mu_c) W||^2``: two MatMul-free broadcasts and one MatMul in a graph.
``mahalanobis++``
    the same distance on L2-normalised features ``z = f / ||f||``: means and the shared
    covariance are fitted on the normalised training features (Mahalanobis++, Mueller
    and Hein, ICML 2025, who trace Mahalanobis's inconsistency across models to the
    spread of feature norms). Measured here: after sparse fine-tuning the feature norms
    drift and plain ``mahalanobis`` loses 1-3 AUROC points against the dense model;
    normalising recovers them (``benchmarks/feature_scores.py``).
``knn``
    cosine similarity to the k-th nearest row of a bounded bank of L2-normalised
    training features ``B`` ``(M, D)``: ``topk(z B^T, k)[k - 1]`` with ``z = f/||f||``
    (subsampled per class in proportion to its size, ``M <= bank_size``).

:class:`FeatureScore` is the one implementation: the assessment calls it in PyTorch
and the exported rejector runs the same module inside the ONNX graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moonprune.errors import CheckpointError, ConfigError, DataError
from moonprune.reliability.registry import SCORES, Score
from moonprune.streaming import Images, batch_rows

#: name -> one-line description; the logit scores live in :mod:`.scores`.
FEATURE_SCORES: dict[str, str] = {
    "mahalanobis": "-(min Mahalanobis distance) of the classifier's input to the class means",
    "mahalanobis++": "-(min Mahalanobis distance) of the L2-normalised classifier input "
    "(Mahalanobis++)",
    "knn": "cosine similarity of the classifier's input to its k-th nearest training feature",
}
for _name, _text in FEATURE_SCORES.items():
    SCORES.register(Score(_name, _text, "features"))
DEFAULT_BANK_SIZE = 2000
DEFAULT_K = 10
#: The stored tensors each score needs inside the graph.
SCORE_TENSORS = {
    "mahalanobis": ("means", "whitening"),
    "mahalanobis++": ("unit_means", "unit_whitening"),
    "knn": ("bank",),
}


@dataclass(frozen=True)
class FeatureStats:
    """What :func:`fit_feature_stats` fitted: ``means`` (K, D), ``whitening`` (D, D)
    with ``precision = W W^T``, ``bank`` (M, D) of unit rows, and KNN's ``k``;
    ``unit_means`` / ``unit_whitening`` are the same fitted on L2-normalised features
    (``mahalanobis++``; None in statistics saved before that score existed)."""

    means: torch.Tensor
    whitening: torch.Tensor
    bank: torch.Tensor
    k: int
    unit_means: torch.Tensor | None = None
    unit_whitening: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """D, the width of the classifier's input."""
        return int(self.means.shape[1])

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (a checkpoint loads with ``weights_only=True``)."""
        out = {"means": self.means, "whitening": self.whitening, "bank": self.bank,
               "unit_means": self.unit_means, "unit_whitening": self.unit_whitening}  # fmt: skip
        tensors = {n: t.detach().cpu() for n, t in out.items() if t is not None}
        return {**tensors, "k": torch.tensor(self.k)}

    def has(self, score: str) -> bool:
        """Whether the tensors feature score ``score`` needs were fitted."""
        return all(getattr(self, n) is not None for n in SCORE_TENSORS[score])

    @classmethod
    def from_dict(cls, obj: Any, source: str) -> FeatureStats:
        """Rebuild from :meth:`to_dict`; a damaged record is a :class:`CheckpointError`."""
        fix = "recreate it with `moonprune compress`"
        names = ("means", "whitening", "bank", "k")
        if not isinstance(obj, Mapping) or not all(
            isinstance(obj.get(n), torch.Tensor) for n in names
        ):
            raise CheckpointError(f"{source}: 'feature_stats' must map {names} to tensors; {fix}")
        means, whitening, bank, k = (obj[n] for n in names)
        ok = (
            means.ndim == 2 and whitening.shape == (means.shape[1], means.shape[1])
            and bank.ndim == 2 and bank.shape[1] == means.shape[1]
            and k.numel() == 1 and not k.is_floating_point() and 1 <= int(k) <= bank.shape[0]
            and all(bool(torch.isfinite(t).all()) for t in (means, whitening, bank))
        )  # fmt: skip
        unit = [obj.get(n) for n in ("unit_means", "unit_whitening")]
        if any(t is not None for t in unit):
            ok = ok and all(
                isinstance(t, torch.Tensor) and t.shape == ref.shape
                and bool(torch.isfinite(t).all())
                for t, ref in zip(unit, (means, whitening), strict=True)
            )  # fmt: skip
        if not ok:
            raise CheckpointError(
                f"{source}: the feature statistics are damaged (shapes {tuple(means.shape)}, "
                f"{tuple(whitening.shape)}, {tuple(bank.shape)}, k {k.tolist()}); {fix}"
            )
        unit_means, unit_whitening = (None if t is None else t.float() for t in unit)
        return cls(means.float(), whitening.float(), bank.float(), int(k),
                   unit_means, unit_whitening)  # fmt: skip

    def nbytes(self, score: str) -> int:
        """Bytes of the float32 tensors ``score`` stores in the graph (0 for a logit score)."""
        tensors = (getattr(self, n) for n in SCORE_TENSORS.get(score, ()))
        return sum(4 * t.numel() for t in tensors if t is not None)


def fit_feature_stats(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_known: int,
    *,
    bank_size: int = DEFAULT_BANK_SIZE,
    k: int = DEFAULT_K,
    seed: int = 0,
) -> FeatureStats:
    """Class means, Ledoit-Wolf shared covariance, and the KNN bank of ``features``.

    ``features`` (N, D) with ``labels`` (N,) in [0, K). The covariance is fitted on
    ``f_i - mu_{y_i}`` (class-centred, ``assume_centered``); its precision ``P`` is
    factored as ``P = W W^T`` in float64. The same again on ``f / ||f||`` gives
    ``mahalanobis++``'s means and whitening. The bank holds ``min(N, bank_size)`` rows,
    each class contributing in proportion to its count (at least one row), drawn
    with ``seed``; rows are divided by their L2 norm.
    """
    if bank_size < 1 or k < 1:
        raise ConfigError(f"feature_bank ({bank_size}) and knn_k ({k}) must be >= 1")
    f = features.detach().cpu().double()
    y = labels.detach().cpu().long()
    if f.ndim != 2 or len(f) != len(y) or not bool(torch.isfinite(f).all()):
        raise DataError(
            f"training features of shape {tuple(f.shape)} (labels {tuple(y.shape)}) are not "
            "finite (N, D) rows; check the model and the training data"
        )
    present = sorted(int(c) for c in y.unique())
    if present != list(range(num_known)):
        raise DataError(
            f"feature statistics need training rows of every class 0..{num_known - 1}, got "
            f"{present}; check the data spec"
        )
    means, whitening = _gaussian(f, y, num_known)
    unit_means, unit_whitening = _gaussian(unit_rows(f), y, num_known)
    bank = _bank(f, y, num_known, bank_size, seed)
    if k > len(bank):
        raise ConfigError(
            f"knn_k = {k} exceeds the {len(bank)} training features in the bank; "
            "lower knn_k or give more training data"
        )
    return FeatureStats(means.float(), whitening.float(), bank.float(), k,
                        unit_means.float(), unit_whitening.float())  # fmt: skip


def _gaussian(f: torch.Tensor, y: torch.Tensor, num_known: int) -> tuple[torch.Tensor, ...]:
    """Class means (K, D) and the whitening ``W`` (``P = W W^T``) of the Ledoit-Wolf
    shared covariance of the class-centred rows of ``f`` (float64)."""
    from sklearn.covariance import LedoitWolf

    means = torch.stack([f[y == c].mean(dim=0) for c in range(num_known)])
    covariance = LedoitWolf(assume_centered=True).fit((f - means[y]).numpy()).covariance_
    precision = np.linalg.inv(covariance)
    return means, torch.from_numpy(np.linalg.cholesky((precision + precision.T) / 2))


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """``features`` (N, D) divided by their L2 norms (a zero row stays zero)."""
    norm = torch.sqrt((features * features).sum(dim=1, keepdim=True)).clamp_min(1e-12)
    return features / norm


def _bank(f: torch.Tensor, y: torch.Tensor, num_known: int, size: int, seed: int) -> torch.Tensor:
    """Up to ``size`` unit rows of ``f``, stratified by class (proportional counts)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(num_known):
        index = (y == c).nonzero().flatten()
        take = min(len(index), max(1, math.floor(size * len(index) / len(f))))
        rows.append(index[torch.randperm(len(index), generator=generator)[:take]])
    return unit_rows(f[torch.cat(rows).sort().values])


def mahalanobis(
    features: torch.Tensor, means: torch.Tensor, whitening: torch.Tensor
) -> torch.Tensor:
    """``(N,)`` ``-min_c ||(f - mu_c) W||^2`` for ``features`` (N, D), ``means`` (K, D),
    ``whitening`` (D, D)."""
    diff = features.unsqueeze(1) - means.unsqueeze(0)  # (N, K, D)
    return -((diff @ whitening) ** 2).sum(dim=-1).amin(dim=-1)


def knn(features: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """``(N,)`` cosine similarity of each row of ``features`` (N, D) to its k-th most
    similar row of ``bank`` (M, D, unit rows)."""
    similarity = unit_rows(features) @ bank.T  # (N, M)
    return torch.topk(similarity, k, dim=1).values[:, k - 1]


class FeatureScore(nn.Module):
    """Score ``name`` of the classifier's input, its statistics as buffers (so they are
    graph constants when exported); only the tensors ``name`` reads are kept."""

    means: torch.Tensor
    whitening: torch.Tensor
    unit_means: torch.Tensor
    unit_whitening: torch.Tensor
    bank: torch.Tensor

    def __init__(self, name: str, stats: FeatureStats) -> None:
        super().__init__()
        if name not in FEATURE_SCORES:
            raise ConfigError(f"{name!r} is not a feature score; choose one of "
                              f"{', '.join(FEATURE_SCORES)}")  # fmt: skip
        if not stats.has(name):
            raise CheckpointError(
                f"these feature statistics were saved before the {name!r} score existed; "
                "recreate the checkpoint with `moonprune compress`, or choose another --score"
            )
        self.name, self.k = name, stats.k
        for tensor in SCORE_TENSORS[name]:
            self.register_buffer(tensor, getattr(stats, tensor).float().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.name == "mahalanobis":
            return mahalanobis(features, self.means, self.whitening)
        if self.name == "mahalanobis++":
            return mahalanobis(unit_rows(features), self.unit_means, self.unit_whitening)
        return knn(features, self.bank, self.k)


@contextmanager
def tapped_input(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, every forward of ``layer`` appends its input, flattened to (N, D),
    to the yielded list (a forward pre-hook, removed on exit)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].flatten(1))

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def collect_features(
    model: nn.Module, x: Images, layer: str, batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, C), features (N, D))`` of ``model`` on ``x`` (N, C, H, W), in eval
    mode without gradients, on the CPU; ``features`` is the input of ``layer``.
    Training flags are restored afterwards."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"no inputs to evaluate (shape {tuple(x.shape)}); check the data spec")
    device = next((t.device for t in (*model.parameters(), *model.buffers())), x.device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    logits, features = [], []
    try:
        with torch.no_grad(), tapped_input(model.get_submodule(layer)) as seen:
            for batch in x.split(batch_size or batch_rows(x.shape)):
                logits.append(model(batch.to(device)).cpu())
                features.append(seen.pop().cpu())
                seen.clear()
    finally:
        for module, training in modes:
            module.train(training)
    return torch.cat(logits), torch.cat(features)
