"""Augmentation (issue 16.5): deterministic per seed, shape-preserving, a crop is a
shifted window of the edge-padded image, a flip mirrors, ``none`` is the identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moonprune.augment import augment_batch, crop_padding
from moonprune.config import TrainConfig
from moonprune.errors import ConfigError


def _batch() -> torch.Tensor:
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["crop", "crop+flip"])
def test_same_seed_same_batch_other_seed_other(name: str) -> None:
    x = _batch()
    a = augment_batch(x, name, torch.Generator().manual_seed(3))
    b = augment_batch(x, name, torch.Generator().manual_seed(3))
    c = augment_batch(x, name, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()


def test_every_crop_is_a_window_of_the_padded_image() -> None:
    x = _batch()
    p = crop_padding(8, 8)
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]  # fmt: skip
        assert found, i
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # not one offset for the whole batch


def test_flip_mirrors_some_rows_and_none_is_identity() -> None:
    x = _batch()
    g = torch.Generator().manual_seed(0)
    assert augment_batch(x, "none", g) is x
    crop = augment_batch(x, "crop", torch.Generator().manual_seed(5))
    both = augment_batch(x, "crop+flip", torch.Generator().manual_seed(5))
    flipped = [not torch.equal(crop[i], both[i]) for i in range(len(x))]
    assert any(flipped) and not all(flipped)
    for i, f in enumerate(flipped):
        if f:
            assert torch.equal(both[i], crop[i].flip(-1))


def test_padding_follows_the_image_size() -> None:
    assert crop_padding(32, 32) == 4 and crop_padding(8, 8) == 1 and crop_padding(28, 28) == 4


def test_unknown_augmentation_is_refused() -> None:
    with pytest.raises(ConfigError, match="--augment must be one of"):
        TrainConfig(augment="mixup")
