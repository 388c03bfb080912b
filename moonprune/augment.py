"""Training-time augmentation of a batch: random crop with padding, horizontal flip.

The MOON reference trains with flip-and-crop augmentation. It matters more here than
it seems: a pretrained model fine-tuned on its own training images without
augmentation classifies almost every row correctly, so MOON's weight
``w = 1 + a / (1 + a p_u)`` (which acts on misclassified rows only) has nothing to act
on. Augmented rows are harder and give the unknown output a signal.

Choices (the reference pads 32x32 CIFAR images by 4 with black and flips half):

- ``crop``: pad by ``max(1, round(size / 8))`` pixels (4 for 32x32, 1 for 8x8, 4 for
  28x28) and crop back at a random offset. Padding replicates the edge pixels instead
  of inserting black, because inputs here are already normalised (black is not 0)
  and the edge of a digit or photo is its own background.
- ``flip``: mirror half the rows left-right. Off in ``crop`` because it changes the
  meaning of digits and text; use ``crop+flip`` for natural images.
- ``none``: the batch as is.

Draws come from a ``torch.Generator`` the caller seeds per epoch, so a resumed run
sees the same augmented batches, and every process of a data-parallel run draws the
same offsets for the global batch before taking its shard.

Example::

    >>> import torch
    >>> x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    >>> out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    >>> out.shape == x.shape
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moonprune.errors import ConfigError

AUGMENTATIONS = ("none", "crop", "crop+flip")


def check_augment(name: str) -> str:
    """``name`` if it is an augmentation, else a ConfigError listing them."""
    if name not in AUGMENTATIONS:
        raise ConfigError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    return name


def crop_padding(height: int, width: int) -> int:
    """Pixels of padding for a random crop: an eighth of the smaller side, at least 1."""
    return max(1, round(min(height, width) / 8))


def augment_batch(
    x: torch.Tensor,
    name: str,
    generator: torch.Generator,
    *,
    n_total: int | None = None,
    rows: slice = slice(None),
) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` augmented by ``name`` (see the module docstring).

    In a data-parallel run ``x`` holds only this process's ``rows`` of a global batch of
    ``n_total`` rows: the draws are made for the whole batch and the rows' share taken,
    so every process draws what a single process would.
    """
    n = len(x) if n_total is None else n_total
    if name == "none" or n == 0:
        return x
    _, c, h, w = x.shape
    p = crop_padding(h, w)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)[rows].to(x.device)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)[rows].to(x.device)
    flip = torch.rand(n, generator=generator)[rows] < 0.5 if name == "crop+flip" else None
    if len(x) == 0:
        return x
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    rows_i = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(len(x), device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, channel, rows_i, cols]
    if flip is not None:
        flipped = flip.to(x.device)
        out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    return out
