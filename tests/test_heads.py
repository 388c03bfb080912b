"""K+1 head surgery on every reference architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moonprune import models
from moonprune.errors import CheckpointError
from moonprune.heads import add_unknown_output_, find_classifier

ARCHS = {
    "demo_cnn": (models.demo_cnn, "classifier"),
    "resnet8": (models.resnet8, "fc"),
    "mobilenet_tiny": (models.mobilenet_tiny, "classifier.1"),
    "mlp_biasfree": (models.mlp_biasfree, "3"),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_surgery_keeps_known_logits_identical(arch: str) -> None:
    factory, expected_layer = ARCHS[arch]
    torch.manual_seed(0)
    model = factory(num_classes=5, in_channels=1).eval()
    x = torch.randn(16, 1, 8, 8)
    before = model(x)
    layer = add_unknown_output_(model, x)
    after = model(x)
    assert layer == expected_layer
    assert after.shape == (16, 6)
    assert torch.equal(after[:, :5], before)
    p_unknown = torch.softmax(after, dim=1)[:, 5]
    assert p_unknown.max() < 1e-3


def test_classifier_found_by_output_not_by_order() -> None:
    class SideHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Linear(4, 3)
            self.aux = nn.Linear(4, 3)  # registered later but not the output

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.aux(x)
            return self.main(x)

    assert find_classifier(SideHead(), torch.randn(2, 4)) == "main"


def test_named_layer_must_be_linear() -> None:
    model = models.demo_cnn(num_classes=3)
    with pytest.raises(CheckpointError, match=r"not nn\.Linear"):
        add_unknown_output_(model, layer="features.0.0")
    with pytest.raises(CheckpointError, match="no layer named"):
        add_unknown_output_(model, layer="nope")


def test_model_without_linear_output_is_reported() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 8), nn.Flatten())
    with pytest.raises(CheckpointError, match=r"--head-layer"):
        find_classifier(model, torch.randn(2, 1, 8, 8))


def test_bias_free_classifier_gets_negative_unknown_bias() -> None:
    model = models.mlp_biasfree(num_classes=4).eval()
    add_unknown_output_(model, torch.randn(2, 1, 8, 8))
    head = model[3]
    assert isinstance(head, nn.Linear) and head.bias is not None
    assert torch.all(head.bias[:4] == 0) and head.bias[4] < -5
