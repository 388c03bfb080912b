"""K+1 head surgery on every reference architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moonprune import models
from moonprune.conventions import unknown_rows
from moonprune.errors import CheckpointError
from moonprune.heads import (
    SeparateUnknownLinear,
    add_unknown_output_,
    expanded_linear,
    find_classifier,
    separate_unknown_linear,
)

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
    # the unknown logit is the mean known logit: never the strict maximum
    assert torch.allclose(after[:, 5], before.mean(dim=1), atol=1e-5)
    assert torch.equal(after.argmax(dim=1), before.argmax(dim=1))
    assert unknown_rows(model) == {f"{expected_layer}.weight": 5}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_surgery_keeps_every_argmax_on_random_inputs(arch: str) -> None:
    factory, _ = ARCHS[arch]
    torch.manual_seed(1)
    model = factory(num_classes=7, in_channels=1).eval()
    x = 3 * torch.randn(512, 1, 8, 8)
    before = model(x).argmax(dim=1)
    add_unknown_output_(model, x[:2])
    assert torch.equal(model(x).argmax(dim=1), before)


def _head(k: int = 5, d: int = 8) -> nn.Linear:
    """A head whose j-th known row reads feature j with weight 10 (bias 0.1)."""
    head = nn.Linear(d, k)
    with torch.no_grad():
        head.weight.copy_(10 * torch.eye(k, d))
        head.bias.fill_(0.1)
    return head


def test_unknown_probability_is_large_when_uncertain_small_when_confident() -> None:
    new = expanded_linear(_head())
    confident = new(torch.eye(5, 8))  # logit 10.1 for one class, 0.1 for the others
    flat = new(torch.full((3, 8), 0.0) + torch.tensor([0, 0, 0, 0, 0, 1.0, 2.0, 3.0]))
    p_confident = torch.softmax(confident, dim=1)[:, 5]
    p_flat = torch.softmax(flat, dim=1)[:, 5]
    assert torch.all(p_confident < 1e-3)
    assert torch.allclose(p_flat, torch.full((3,), 1 / 6))  # all logits equal: 1 / (K + 1)
    assert torch.all(p_flat > 0.01)


def test_a_tie_keeps_the_known_argmax() -> None:
    # zero features: every logit is its bias; equal biases tie with the unknown logit,
    # and argmax returns the first maximal index, a known class
    new = expanded_linear(_head())
    logits = new(torch.zeros(1, 8))
    assert torch.all(logits == logits[0, 0])
    assert int(logits.argmax(dim=1)) == 0
    # biases whose float32 sum rounds: the unknown bias (mean taken in float64, then
    # rounded to nearest) is still never above the largest known bias
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        head = nn.Linear(8, 7)
        with torch.no_grad():
            head.bias.copy_(torch.full((7,), float(torch.rand(1, generator=g))))
            head.bias[3] += float(torch.rand(1, generator=g)) * 1e-6
        new = expanded_linear(head)
        assert new.bias[7] <= new.bias[:7].max()
        z = new(torch.zeros(1, 8))
        assert int(z.argmax(dim=1)) == int(head(torch.zeros(1, 8)).argmax(dim=1))


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


def test_bias_free_classifier_gets_a_zero_bias_and_the_mean_row() -> None:
    # the bias (0 everywhere) keeps the K+1 head's parameters those of earlier checkpoints
    model = models.mlp_biasfree(num_classes=4).eval()
    classifier = model[3]
    assert isinstance(classifier, nn.Linear)
    old = classifier.weight.detach().clone()
    add_unknown_output_(model, torch.randn(2, 1, 8, 8))
    head = model[3]
    assert isinstance(head, nn.Linear) and head.bias is not None
    assert torch.all(head.bias == 0)
    assert torch.equal(head.weight[:4], old)
    assert torch.allclose(head.weight[4], old.mean(dim=0))
    with torch.no_grad():
        flat = torch.softmax(head(torch.zeros(1, head.in_features)), dim=1)
    assert float(flat[0, 4]) == pytest.approx(1 / 5)


def test_surgery_keeps_dtype_and_device() -> None:
    head = _head().double()
    new = expanded_linear(head)
    assert new.weight.dtype == torch.float64 and new.weight.device == head.weight.device
    assert torch.equal(new.weight[5], head.weight.mean(dim=0))
    assert torch.equal(new.bias[5], head.bias.mean())


# -- the separate unknown head (beyond the paper; compress's head with --unknowns) ----


def _separate(k: int = 5, d: int = 7, seed: int = 0) -> tuple[nn.Linear, SeparateUnknownLinear]:
    torch.manual_seed(seed)
    layer = nn.Linear(d, k)
    return layer, separate_unknown_linear(layer)


def test_separate_head_starts_at_one_over_k_plus_one_and_keeps_known_logits() -> None:
    layer, head = _separate()
    x = torch.randn(32, 7) * 3
    z = head(x)
    assert torch.equal(z[:, :5], layer(x))  # the known logits are the dense model's
    p = torch.softmax(z.double(), dim=-1)
    assert torch.allclose(p[:, 5], torch.full((32,), 1 / 6, dtype=torch.float64), atol=1e-6)
    assert torch.equal(z.argmax(-1), layer(x).argmax(-1))  # logsumexp - log K <= max
    assert unknown_rows(nn.Sequential(head)) == {"0.weight": 5}


def test_separate_head_matches_the_hand_formula_and_the_loss_splits() -> None:
    """z_u = logsumexp(z_known) + w_u.x + b_u; then p(unknown) = sigmoid(g), a row of
    class y costs CE_K(known, y) + softplus(g) and a row labelled K costs softplus(-g)."""
    _, head = _separate(seed=1)
    with torch.no_grad():
        head.weight[5].normal_()
        head.bias[5] = 0.7
    x = torch.randn(16, 7, dtype=torch.float64)
    head = head.double()
    z = head(x)
    known = x @ head.weight[:5].T + head.bias[:5]
    g = x @ head.weight[5] + head.bias[5]
    assert torch.allclose(z[:, 5], torch.logsumexp(known, dim=-1) + g)
    assert torch.allclose(torch.softmax(z, dim=-1)[:, 5], torch.sigmoid(g))
    y = torch.randint(0, 5, (16,))
    ce = nn.functional.cross_entropy(z, y, reduction="none")
    expected = nn.functional.cross_entropy(known, y, reduction="none") + nn.functional.softplus(g)
    assert torch.allclose(ce, expected)
    ce_k = nn.functional.cross_entropy(z, torch.full((16,), 5), reduction="none")
    assert torch.allclose(ce_k, nn.functional.softplus(-g))


def test_the_unknown_output_shapes_nothing_below_or_beside_it() -> None:
    """A synthesized row (label K) moves only the unknown row (what reaches the known
    logits through the logsumexp cancels: zero up to rounding); an ID row moves the
    layers below exactly as the known classes' cross-entropy alone would."""
    torch.manual_seed(2)
    body = nn.Sequential(nn.Linear(6, 7), nn.ReLU())
    _, head = _separate(seed=2)
    x = torch.randn(8, 6)
    nn.functional.cross_entropy(head(body(x)), torch.full((8,), 5)).backward()
    assert body[0].weight.grad.abs().max() < 1e-7
    assert head.weight.grad[:5].abs().max() < 1e-6 and head.bias.grad[:5].abs().max() < 1e-6
    assert head.weight.grad[5].abs().sum() > 0 and float(head.bias.grad[5]) < 0
    y = torch.randint(0, 5, (8,))
    body.zero_grad()
    nn.functional.cross_entropy(head(body(x)), y).backward()
    with_unknown = body[0].weight.grad.clone()
    body.zero_grad()
    nn.functional.cross_entropy(nn.functional.linear(body(x), head.weight[:5], head.bias[:5]),
                                y).backward()  # fmt: skip
    assert torch.allclose(with_unknown, body[0].weight.grad, atol=1e-7)


def test_separate_head_surgery_exports_with_parity(tmp_path) -> None:
    from moonprune.exporters.onnx_export import export_onnx

    torch.manual_seed(3)
    model = models.demo_cnn(num_classes=4, width=4).eval()
    x = torch.randn(6, 1, 8, 8)
    assert add_unknown_output_(model, x, kind="separate") == "classifier"
    assert isinstance(model.classifier, SeparateUnknownLinear)
    with torch.no_grad():
        model.classifier.weight[4].normal_()
    report = export_onnx(model, tmp_path / "m.onnx", num_known=4, input_shape=(1, 8, 8),
                         threshold=0.5)  # fmt: skip
    assert report.labels_agree and report.parity_max_abs_diff < 1e-4
    with pytest.raises(ValueError, match="kind must be one of"):
        add_unknown_output_(models.demo_cnn(num_classes=4, width=4), x, kind="median")
