"""The built-in unknown generators of :mod:`moonprune.unknowns`: pure functions of
``(x, y, m, generator)`` that make ``m`` rows labelled "unknown" from a batch.

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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: ``fn(x, y, m, generator) -> m rows``; x ``(N, C, H, W)`` (input) or ``(N, D)`` (feature).
GeneratorFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], torch.Tensor]


def _pick(n: int, m: int, g: torch.Generator) -> torch.Tensor:
    """``m`` row indices in ``[0, n)`` (with replacement when ``m > n``)."""
    return torch.randint(n, (m,), generator=g)


def patch2(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    return patch_shuffle(x, y, m, g, grid=2)


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


def mixup(
    x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator, low: float = 0.35,
    span: float = 0.3,
) -> torch.Tensor:  # fmt: skip
    """Row ``i`` blended with a row ``j`` of another class (the same class only when the
    batch holds one class), ``lam ~ U(low, low + span)``: ``U(0.35, 0.65)``."""
    i = _pick(len(x), m, g)
    other = (y.cpu()[None, :] != y.cpu()[i][:, None]).double()
    noise = torch.rand(m, len(x), generator=g, dtype=torch.float64)
    j = torch.argmax(noise + 2.0 * other, dim=1)  # a random row of another class
    lam = (low + span * torch.rand(m, generator=g)).to(x)
    lam = lam.reshape(m, *([1] * (x.ndim - 1)))
    return lam * x[i.to(x.device)] + (1 - lam) * x[j.to(x.device)]


def blur(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur (sigma a sixth of the longer side, reflected edges) of ``m`` picked
    rows, as two small matrix products ``B_h @ row @ B_w^T``: the same numbers as
    reflect-padding then a separable convolution, with fewer operator calls (on small
    images the calls, not the arithmetic, are the cost: issue 18's time target)."""
    del y
    rows = x[_pick(len(x), m, g).to(x.device)]
    h, w = x.shape[-2:]
    sigma = max(h, w) / 6
    radius = max(1, min(h, w) // 2 - 1 if min(h, w) > 2 else 1)
    pad = min(radius, h - 1, w - 1)
    if pad < 1:
        return rows.contiguous()
    along_h = blur_matrix(h, sigma, radius, pad).to(x)
    along_w = blur_matrix(w, sigma, radius, pad).to(x)
    return (along_h @ rows @ along_w.T).contiguous()


@functools.lru_cache(maxsize=16)
def blur_matrix(n: int, sigma: float, radius: int, pad: int) -> torch.Tensor:
    """``(n, n)`` float64: the Gaussian taps ``-pad..pad`` (of a kernel of ``radius``,
    truncated and renormalised) applied along a side of ``n`` reflect-padded by ``pad``
    pixels (the edge pixel not repeated, as ``F.pad(mode="reflect")``)."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)[radius - pad : radius + pad + 1]
    kernel = kernel / kernel.sum()
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j, tap in enumerate(kernel.tolist()):
            q = i + j - pad
            q = -q if q < 0 else (2 * (n - 1) - q if q > n - 1 else q)
            matrix[i, q] += tap
    return matrix


def permute(x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    del y
    rows = x[_pick(len(x), m, g).to(x.device)]
    flat = rows.flatten(2)
    order = torch.argsort(torch.rand(m, flat.shape[-1], generator=g), dim=1).to(x.device)
    return flat.gather(2, order[:, None, :].expand_as(flat)).reshape(rows.shape)


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


#: ``(name, description, space, fn)`` of each built-in generator, as registered in
#: :data:`moonprune.unknowns.UNKNOWNS`; ``space`` is ``input`` or ``feature``.
BUILT_IN: tuple[tuple[str, str, str, GeneratorFn], ...] = (
    ("patch2", "patches of a 2x2 grid shuffled per row", "input", patch2),
    ("patch4", "patches of a 4x4 grid shuffled per row", "input", patch4),
    ("mixup", "two images of different classes blended 35-65%", "input", mixup),
    ("blur", "heavy Gaussian blur (sigma a sixth of the side)", "input", blur),
    ("permute", "pixels permuted per row (the histogram, no shape)", "input", permute),
    ("lowfreq", "low-frequency noise with the batch's mean and std", "input", lowfreq),
    ("vos", "feature-space outliers from class-Gaussian tails (VOS)", "feature", vos),
)
