"""Synthesized unknowns (``--unknowns``): rows labelled "unknown" (column K), made from
the batch itself, so the K+1 output gets direct evidence without any OOD data.

MOON never shows the network an example of "unknown"; cross-entropy lowers the unknown
logit on every correctly classified row and p(unknown) ends near 1e-7
(benchmarks/RESULTS.md). This module adds, to each training batch of ``n`` ID rows,
``m = round(fraction * n)`` synthesized rows labelled K, and to the loss

    L = L_MOON(ID rows) + weight * mean_j CE(z_j, K)        (j over synthesized rows)

Generators (a registry, like the maskers'), pure functions of ``(x, y, m, generator)``:

- input space, forwarded with the ID rows (so BatchNorm sees them):
  ``patch2`` / ``patch4`` (patches of an s x s grid shuffled per row), ``mixup`` (two
  images of different classes blended with weight 0.35-0.65), ``blur`` (Gaussian blur,
  sigma = a sixth of the side), ``permute`` (pixels permuted per row: the intensity
  histogram without any shape), ``lowfreq`` (Gaussian noise drawn at a quarter of the
  resolution, upsampled, matched to the batch's per-channel mean and std);
- feature space, ``vos`` (Du et al., "VOS: learning what you don't know by virtual
  outlier synthesis", ICLR 2022): a class-conditional Gaussian with shared covariance
  is fitted to the batch's classifier inputs ``f`` (detached; covariance shrunk 10% to
  its mean eigenvalue), and points are drawn on its low-likelihood shell: Mahalanobis
  radius ``r * U(1.5, 2.5)``, ``r`` the larger of the batch rows' largest radius and the
  chi-square's ``D + 4 sqrt(2 D)`` point (VOS instead keeps the least likely of many draws
  per class; a batch-sized fit underestimates the spread, and the chi-square tail alone
  put 13% of ID test rows into "unknown" on digits). They go through the final
  classifier only: they never touch BatchNorm and cost one small matrix product.

``synth`` is the evidence-chosen default set (:data:`SYNTH`; see
``benchmarks/unknowns_study.py`` and RESULTS.md); ``none`` is MOON as published, and
leaves the training path untouched. Names can be joined with ``+`` (``patch4+vos``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moonprune.conventions import UNKNOWN_ROW_ATTR
from moonprune.errors import ConfigError

#: ``fn(x, y, m, generator) -> m rows``; x ``(N, C, H, W)`` (input) or ``(N, D)`` (feature).
GeneratorFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], torch.Tensor]

NONE = "none"
SYNTH = "synth"
#: What ``synth`` means, by the study in RESULTS.md (unknowns-study: digits and mnist5k
#: 0-5, cnn and resnet8, RigL 90%, seed 0; one seed, so a choice, not a proof): every
#: generator that helps (blur, lowfreq, mixup) raises MSP's mean AUROC by 10-18 points
#: and the ``unknown`` score to 87-97%, and costs 0.5-0.75 accuracy points and some
#: near-OOD AUROC; ``blur`` costs the least near-OOD AUROC of them and sends the fewest ID
#: test rows to "unknown" (<= 0.9%; mixup up to 8.8%). Patch shuffling and pixel
#: permutation taught an artifact detector that rates textures and photos as *more* ID
#: than ID; ``vos`` sent 11% of ID test rows to "unknown". ``synth`` is not the default
#: of ``compress``: the deployed feature score (``mahalanobis++``) does not improve.
SYNTH_SET: tuple[str, ...] = ("blur",)


@dataclass(frozen=True)
class UnknownGenerator:
    """One way to make unknowns: ``space`` is ``input`` (images) or ``feature``."""

    name: str
    description: str
    space: str
    fn: GeneratorFn


class UnknownsRegistry:
    """Generators by name; ``resolve("synth")`` gives the default set.

    Example::

        >>> UNKNOWNS.resolve("patch4+vos")
        ('patch4', 'vos')
        >>> UNKNOWNS.resolve("none")
        ()
    """

    def __init__(self) -> None:
        self._generators: dict[str, UnknownGenerator] = {}

    def register(
        self, name: str, description: str, space: str
    ) -> Callable[[GeneratorFn], GeneratorFn]:
        def add(fn: GeneratorFn) -> GeneratorFn:
            self._generators[name] = UnknownGenerator(name, description, space, fn)
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._generators)

    def describe(self) -> dict[str, str]:
        return {n: self._generators[n].description for n in self.names()}

    def get(self, name: str) -> UnknownGenerator:
        if name not in self._generators:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"--unknowns: no generator {name!r}{hint}; use synth, none, or "
                f"names joined by '+' from: {', '.join(self.names())}"
            )
        return self._generators[name]

    def resolve(self, spec: str) -> tuple[str, ...]:
        """The generator names of ``spec`` (``none`` -> ``()``), validated."""
        if spec == NONE:
            return ()
        names = SYNTH_SET if spec == SYNTH else tuple(spec.split("+"))
        for name in names:
            self.get(name)
        return names


UNKNOWNS = UnknownsRegistry()


def check_unknowns(spec: str, fraction: float, weight: float) -> None:
    """Validate the three settings (ConfigError naming the bad value)."""
    if not isinstance(spec, str):
        raise ConfigError(f"unknowns must be a string such as 'synth' or 'none', got {spec!r}")
    UNKNOWNS.resolve(spec)
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"unknowns_fraction must be in (0, 1], got {fraction}; e.g. 0.25")
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"unknowns_weight must be > 0, got {weight}; e.g. 0.5")


def _pick(n: int, m: int, g: torch.Generator) -> torch.Tensor:
    """``m`` row indices in ``[0, n)`` (with replacement when ``m > n``)."""
    return torch.randint(n, (m,), generator=g)


@UNKNOWNS.register("patch2", "patches of a 2x2 grid shuffled per row", "input")
def patch2(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    return patch_shuffle(x, y, m, g, grid=2)


@UNKNOWNS.register("patch4", "patches of a 4x4 grid shuffled per row", "input")
def patch4(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    return patch_shuffle(x, y, m, g, grid=4)


def patch_shuffle(
    x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator, grid: int
) -> torch.Tensor:
    """The ``grid x grid`` patches of ``m`` picked rows, permuted per row. A side not
    divisible by ``grid`` keeps its last pixels in place; a side shorter than ``grid``
    uses one patch per pixel."""
    del y
    rows = x[_pick(len(x), m, g).to(x.device)].clone()
    h, w = x.shape[-2:]
    gh, gw = min(grid, h), min(grid, w)
    ph, pw = h // gh, w // gw
    core = rows[..., : gh * ph, : gw * pw]
    c = x.shape[1]
    patches = core.reshape(m, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(m, gh * gw, -1)
    order = torch.argsort(torch.rand(m, gh * gw, generator=g), dim=1).to(x.device)
    patches = patches.gather(1, order[..., None].expand_as(patches))
    core = patches.reshape(m, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(core.shape)
    rows[..., : gh * ph, : gw * pw] = core
    return rows


@UNKNOWNS.register("mixup", "two images of different classes blended 35-65%", "input")
def mixup(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """Row ``i`` blended with a row ``j`` of another class (the same class only when the
    batch holds one class), ``lam ~ U(0.35, 0.65)``."""
    i = _pick(len(x), m, g)
    other = (y.cpu()[None, :] != y.cpu()[i][:, None]).double()
    noise = torch.rand(m, len(x), generator=g, dtype=torch.float64)
    j = torch.argmax(noise + 2.0 * other, dim=1)  # a random row of another class
    lam = (0.35 + 0.3 * torch.rand(m, generator=g)).to(x)
    lam = lam.reshape(m, *([1] * (x.ndim - 1)))
    return lam * x[i.to(x.device)] + (1 - lam) * x[j.to(x.device)]


@UNKNOWNS.register("blur", "heavy Gaussian blur (sigma a sixth of the side)", "input")
def blur(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    del y
    rows = x[_pick(len(x), m, g).to(x.device)]
    h, w = x.shape[-2:]
    sigma = max(h, w) / 6
    radius = max(1, min(h, w) // 2 - 1 if min(h, w) > 2 else 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x)
    c = x.shape[1]
    pad = min(radius, h - 1, w - 1)
    out = rows
    if pad >= 1:
        k = kernel[radius - pad : radius + pad + 1]
        k = k / k.sum()
        out = F.pad(out, (pad, pad, pad, pad), mode="reflect")
        out = F.conv2d(out, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        out = F.conv2d(out, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out.contiguous()


@UNKNOWNS.register("permute", "pixels permuted per row (the histogram, no shape)", "input")
def permute(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    del y
    rows = x[_pick(len(x), m, g).to(x.device)]
    flat = rows.flatten(2)
    order = torch.argsort(torch.rand(m, flat.shape[-1], generator=g), dim=1).to(x.device)
    return flat.gather(2, order[:, None, :].expand_as(flat)).reshape(rows.shape)


@UNKNOWNS.register("lowfreq", "low-frequency noise with the batch's mean and std", "input")
def lowfreq(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    del y
    c, h, w = x.shape[1:]
    small = torch.randn(m, c, max(2, h // 4), max(2, w // 4), generator=g).to(x)
    noise = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    noise = (noise - noise.mean(dim=(0, 2, 3), keepdim=True)) / (
        noise.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    )
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True) if len(x) * h * w > 1 else torch.ones_like(mean)
    return torch.nan_to_num(noise * std + mean)


@UNKNOWNS.register("vos", "feature-space outliers from class-Gaussian tails (VOS)", "feature")
def vos(f: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """``m`` points on the low-likelihood shell of the batch's class Gaussians (module
    docstring); ``f`` ``(N, D)`` detached features, ``y`` ``(N,)`` labels."""
    d = f.shape[1]
    f64, labels = f.detach().double().cpu(), y.cpu()
    classes, inverse = torch.unique(labels, return_inverse=True)
    means = torch.zeros(len(classes), d, dtype=torch.float64).index_add_(0, inverse, f64)
    means /= torch.bincount(inverse, minlength=len(classes))[:, None].double()
    centred = f64 - means[inverse]
    cov = centred.T @ centred / max(len(f64) - 1, 1)
    scale = float(cov.diagonal().mean()) + 1e-3 * float(f64.pow(2).mean()) + 1e-8
    cov = 0.9 * cov + 0.1 * scale * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov + 1e-9 * scale * torch.eye(d, dtype=torch.float64))
    which = inverse[_pick(len(f64), m, g)]
    u = torch.randn(m, d, generator=g, dtype=torch.float64)
    u /= u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # the batch's own largest Mahalanobis radius: a Gaussian fitted on n <= D rows
    # underestimates the spread, so the chi-square tail alone lands among ID rows
    seen = torch.linalg.solve_triangular(chol, centred.T, upper=False).norm(dim=0).max()
    chi = torch.sqrt(torch.tensor(d + 4.0 * math.sqrt(2 * d), dtype=torch.float64))
    radius = torch.maximum(seen, chi) * (1.5 + torch.rand(m, 1, generator=g, dtype=torch.float64))
    out = means[which] + (u * radius) @ chol.T
    return torch.nan_to_num(out).to(device=f.device, dtype=f.dtype)


def shares(m: int, parts: int) -> list[int]:
    """``m`` rows split over ``parts`` generators as evenly as possible, first ones first."""
    return [m // parts + (1 if i < m % parts else 0) for i in range(parts)]


def rows_for(n: int, fraction: float) -> int:
    """Synthesized rows for ``n`` ID rows: ``round(fraction * n)`` (half up)."""
    return int(fraction * n + 0.5)


def synthesize(
    names: tuple[str, ...], x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator, space: str
) -> torch.Tensor:
    """The ``space`` generators' rows of a batch: the ``m`` rows are shared out over
    *all* of ``names`` (see :func:`shares`), and those of ``space`` are made here."""
    parts = [
        UNKNOWNS.get(name).fn(x, y, k, g)
        for name, k in zip(names, shares(m, len(names)), strict=True)
        if UNKNOWNS.get(name).space == space and k > 0 and len(x) > 0
    ]
    if not parts:
        return x.new_zeros((0, *x.shape[1:]))
    return torch.cat(parts)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The seeded source of one epoch's draws on one rank (a resumed run redraws them)."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + rank + 524_287)


def unknown_loss_sum(logits: torch.Tensor, unknown: int) -> torch.Tensor:
    """Sum over rows of ``CE(logits, unknown)`` (0 for no rows)."""
    target = torch.full((len(logits),), unknown, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="sum")


def unknown_head(model: torch.nn.Module) -> torch.nn.Module:
    """The layer carrying the unknown output (marked by the K+1 surgery)."""
    for module in model.modules():
        if isinstance(getattr(module, UNKNOWN_ROW_ATTR, None), int):
            return module
    raise ConfigError(
        "--unknowns needs the K+1 head (the unknown output); none was found in the model"
    )


def probe(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, names: tuple[str, ...], seed: int
) -> dict[str, torch.Tensor]:
    """p(unknown) of ``model`` (eval mode, no gradient) on rows each generator of
    ``names`` makes from ``(x, y)`` (as many rows as ``x``): what the report shows for
    the synthesized rows. Feature generators draw from the model's features of ``x``."""
    head = unknown_head(model)
    k = int(getattr(head, UNKNOWN_ROW_ATTR))
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = model.training
    model.eval()
    out: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            seen: list[torch.Tensor] = []
            hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            try:
                model(x)
            finally:
                hook.remove()
            features = seen[0].flatten(1)
            for name in names:
                gen = UNKNOWNS.get(name)
                g = torch.Generator().manual_seed(seed)
                if gen.space == "input":
                    logits = model(gen.fn(x, y, len(x), g))
                else:
                    logits = head(gen.fn(features, y, len(x), g))
                out[name] = torch.softmax(logits.double(), dim=-1)[:, k].cpu()
    finally:
        model.train(was_training)
    return out
