"""K+1 head surgery: give a K-class classifier the extra "unknown" output (index K).

The final linear layer ``z = W x + b`` (``W``: ``(K, d)``) gets one more row. The K
known rows and biases are copied unchanged, so the K known logits are bit-identical
after the surgery. The unknown row is the mean of the known rows (MOON_METHOD.md,
part 1):

    w_u = (1/K) sum_k W_k,   b_u = (1/K) sum_k b_k,   so   z_u = (1/K) sum_k z_k

The unknown logit is the mean known logit, never above the largest, so every
known-class argmax is kept (an exact tie, all K logits equal, goes to the known class:
``argmax`` returns the first maximal index and the unknown column is last). The means
are taken in float64 and rounded to nearest, so ``b_u`` never exceeds the largest
known bias, and a zero-feature input ties at worst. ``p(unknown)`` then follows the
input's uncertainty: ``1/(K+1)`` for flat logits, about ``e^(mean - max)`` for a
confident one, and every gradient on the unknown logit (proportional to ``p_u``) can
move it. The earlier row (weight 0, bias 10 below the smallest) started ``p_u`` near
1e-5 and left it there. A mean row with a bias offset ``c`` ranks inputs by ``p_u``
exactly as ``c = 0`` does (``p_u`` is monotone in ``z_u - logsumexp(z)`` either way);
``c > 0`` can make the unknown column the argmax of flat inputs, and ``c < 0`` scales
``p_u`` and its gradients down, so the offset is 0.

A bias-free classifier gets a bias vector that is 0 everywhere (the mean of zero
biases): known logits stay identical, and the K+1 head has the parameters of the heads
earlier moonprune versions wrote, so their checkpoints still load.

The new layer is marked with :data:`moonprune.conventions.UNKNOWN_ROW_ATTR` so that
maskers keep the unknown row active.

The ``separate`` head (:class:`SeparateUnknownLinear`, beyond the paper;
``--unknown-head separate``) computes the unknown logit as ``logsumexp(known logits) +
g``, with ``g`` the unknown row's output on the features *detached*. Then ``p(unknown)
= sigmoid(g)`` and ``p(k) = (1 - sigmoid(g)) softmax(known)_k``, so a row's (K+1)-way
cross-entropy splits into the known classes' cross-entropy plus ``softplus(g)`` (label
k) or ``softplus(-g)`` (label K): synthesized rows (``--unknowns``) train ``g`` alone,
and nothing the unknown output learns reshapes the known logits or the layers below.
Why it exists: with the mean head, synthesized rows cost accuracy beyond MOON's own cost
by making ID rows hold down a rising unknown logit (RESULTS.md "What the ablations of
session 23 say"). Measured (session 25, README "Synthesized unknowns"): at 95% sparsity
on mnist5k it keeps 0.65 point more accuracy than the mean head, but on digits and at
90% its ``g``, a linear probe on features it does not shape, ranks the held-out digits
worse (MSP near-OOD AUROC 0.9-1.9 points below the mean head's), so ``mean`` stays the
default. The row starts at weight 0 and bias ``-log K``: ``p(unknown) = 1/(K+1)`` on
every input (about what MOON_METHOD.md part 1 says the reference's from-scratch init
gives), and since ``logsumexp(z) - log K <= max z`` every known argmax is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moonprune.conventions import UNKNOWN_ROW_ATTR
from moonprune.errors import CheckpointError


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"the model has no layer named {name!r}; pass the final classifier's name "
            "(see `moonprune inspect`)"
        ) from None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_classifier(model: nn.Module, example_input: torch.Tensor) -> str:
    """Name of the ``nn.Linear`` whose output is the model's output.

    Runs one forward pass with hooks on every linear layer and picks the last one
    whose output equals the model's output, so a classifier nested in an
    ``nn.Sequential`` (or followed by a no-op such as ``Identity``) is found too.

    Example::

        >>> import torch, moonprune
        >>> net = moonprune.models.resnet8(num_classes=3)
        >>> moonprune.find_classifier(net, torch.randn(2, 3, 8, 8))
        'fc'
    """
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.append((name, out.detach()))
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            result = model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for name, out in reversed(outputs):
        if out.shape == result.shape and torch.equal(out, result):
            return name
    raise CheckpointError(
        "could not find the final classifier: no nn.Linear produces the model's output; "
        "name it with --head-layer"
    )


def expanded_linear(layer: nn.Linear) -> nn.Linear:
    """A copy of ``layer`` with one more output row, the mean of the others (module
    docstring), marked as the unknown row. Same device and dtype as ``layer``.

    Example::

        >>> import torch
        >>> head = expanded_linear(torch.nn.Linear(4, 3))
        >>> head.out_features, torch.allclose(head.weight[3], head.weight[:3].mean(0))
        (4, True)
    """
    k, d = layer.out_features, layer.in_features
    new = nn.Linear(d, k + 1, bias=True, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight[:k] = layer.weight
        new.weight[k] = layer.weight.double().mean(dim=0).to(layer.weight.dtype)
        if layer.bias is not None:
            new.bias[:k] = layer.bias
            new.bias[k] = layer.bias.double().mean().to(layer.bias.dtype)
        else:
            new.bias.zero_()
    setattr(new, UNKNOWN_ROW_ATTR, k)
    return new


#: the kinds of K+1 head (module docstring): ``mean`` (MOON as published), ``separate``
UNKNOWN_HEADS = ("mean", "separate")


class SeparateUnknownLinear(nn.Linear):
    """A K+1 classifier whose unknown logit is ``logsumexp(known) + g(detached x)``
    (module docstring). Its weight and bias are an ordinary ``(K+1, d)`` linear's, so
    maskers, averaging, channel pruning and checkpoints treat it as one.

    Example::

        >>> import torch
        >>> head = separate_unknown_linear(torch.nn.Linear(4, 3))
        >>> p = torch.softmax(head(torch.randn(5, 4)), dim=-1)
        >>> torch.allclose(p[:, 3], torch.full((5,), 0.25))
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(getattr(self, UNKNOWN_ROW_ATTR))
        known = F.linear(x, self.weight[:k], self.bias[:k])
        g = F.linear(x.detach(), self.weight[k:], self.bias[k:])
        return torch.cat([known, torch.logsumexp(known, dim=-1, keepdim=True) + g], dim=-1)


def separate_unknown_linear(layer: nn.Linear) -> SeparateUnknownLinear:
    """A :class:`SeparateUnknownLinear` from the K-class ``layer``: known rows copied,
    the unknown row at weight 0 and bias ``-log K`` (``p(unknown) = 1/(K+1)``)."""
    k, d = layer.out_features, layer.in_features
    new = SeparateUnknownLinear(d, k + 1, device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight[:k] = layer.weight
        new.weight[k] = 0.0
        new.bias[:k] = 0.0 if layer.bias is None else layer.bias
        new.bias[k] = -math.log(k)
    setattr(new, UNKNOWN_ROW_ATTR, k)
    return new


def head_kind(head: nn.Module) -> str:
    """``separate`` or ``mean``: the kind of the K+1 classifier ``head``."""
    return "separate" if isinstance(head, SeparateUnknownLinear) else "mean"


def unknown_head_kind(model: nn.Module, layer: str | None) -> str | None:
    """The kind (:func:`head_kind`) of the K+1 head at ``layer``, None without one."""
    return None if layer is None else head_kind(_get_module(model, layer))


def add_unknown_output_(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    layer: str | None = None,
    kind: str = "mean",
) -> str:
    """Replace the final classifier of ``model`` in place by its K+1 version.

    Give ``layer`` (the module name) or ``example_input`` (one batch, to find it);
    ``kind`` is one of :data:`UNKNOWN_HEADS` (module docstring). Returns the layer's
    name, which a checkpoint records (with the kind) so the surgery can be replayed on
    a freshly built model before loading K+1 weights.

    Example::

        >>> import torch, moonprune
        >>> model = moonprune.models.demo_cnn(num_classes=4, width=4).eval()
        >>> x = torch.randn(3, 1, 8, 8)
        >>> before = model(x)
        >>> moonprune.add_unknown_output_(model, x)
        'classifier'
        >>> after = model(x)
        >>> after.shape, torch.equal(after[:, :4], before)
        (torch.Size([3, 5]), True)
    """
    if layer is None:
        if example_input is None:
            raise ValueError("pass example_input (to find the classifier) or its layer name")
        layer = find_classifier(model, example_input)
    module = _get_module(model, layer)
    if not isinstance(module, nn.Linear):
        raise CheckpointError(
            f"layer {layer!r} is a {type(module).__name__}, not nn.Linear; "
            "the unknown output is added to a linear classifier"
        )
    if kind not in UNKNOWN_HEADS:
        raise ValueError(f"kind must be one of {UNKNOWN_HEADS}, got {kind!r}")
    new = expanded_linear(module) if kind == "mean" else separate_unknown_linear(module)
    _set_module(model, layer, new)
    return layer


def output_width(model: nn.Module, example_input: torch.Tensor) -> int:
    """Number of logits the model produces for ``example_input``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise CheckpointError(
            f"the model returns a tensor of shape {tuple(out.shape)}; a classifier must "
            "return logits of shape (N, K)"
        )
    return int(out.shape[1])
