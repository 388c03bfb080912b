"""Which weights a masker keeps: the per-layer budget, top-k selection, the pinned row.

The unknown row of a K+1 head (marked by :func:`moonprune.heads.add_unknown_output_`,
read with :func:`moonprune.conventions.unknown_rows`) is never pruned: a masked-away
row makes the unknown logit a constant, and magnitude top-k would rank it low. Only
that row is exempt, not the whole classifier (the MOON paper masks every conv and
linear layer, the classifier included). The row's weights count as kept weights in
the global budget, and the rest of the budget is spread over the other weights as
usual: with ``N`` prunable weights of which ``P`` are pinned, the layer densities
(ERK or uniform) are computed for the global density ``(d N - P) / (N - P)`` over the
unpinned weights (the head as a ``(K, in)`` layer), and the head then keeps its share
plus the row. So the density over all prunable weights is the target ``d``, as
``measured_sparsity`` counts it, and the known rows of the head keep their share
(charging the row to the head alone would empty them at 95% uniform). The masker base
class (:class:`moonprune.sparsity.base.Masker`) enforces the row for every masker,
plug-ins included: after ``initial_masks`` and after every ``update`` an inactive row
weight is switched on in place of the active weight of smallest ``|w|`` elsewhere in
its layer (the layer's count is kept); SET and RigL never drop the row in the first
place.
"""

from __future__ import annotations

import math

import torch

from moonprune.conventions import unknown_rows
from moonprune.errors import ConfigError
from moonprune.sparsity.config import MaskerConfig
from moonprune.sparsity.distributions import keep_counts, layer_densities


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of its ``k`` largest entries.

    Ties are broken by ``torch.topk``: deterministic on one device, not specified.
    """
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view_as(scores)


def pinned_entries(
    model: torch.nn.Module, params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per masked weight of ``params`` that holds the unknown row, a bool mask (the
    weight's shape) of that row; weights without one are left out."""
    pinned: dict[str, torch.Tensor] = {}
    for name, row in unknown_rows(model).items():
        if name in params:
            entries = torch.zeros_like(params[name], dtype=torch.bool)
            entries[row] = True
            pinned[name] = entries
    return pinned


def target_counts(
    params: dict[str, torch.Tensor], pinned: dict[str, torch.Tensor], config: MaskerConfig
) -> dict[str, int]:
    """Kept weights per layer at ``config``'s density (ERK or uniform), the ``pinned``
    entries included and counted in the budget (module docstring)."""
    shapes = {n: p.shape for n, p in params.items()}
    if not pinned:
        densities = layer_densities(shapes, config.density, config.distribution)
        return keep_counts(shapes, densities)
    counted = {n: int(m.sum()) for n, m in pinned.items()}
    # pinned entries are whole output rows: the rest of the layer is a smaller layer
    free = {n: (s[0] - counted.get(n, 0) // math.prod(s[1:]), *s[1:]) for n, s in shapes.items()}
    total, n_pinned = sum(math.prod(s) for s in shapes.values()), sum(counted.values())
    density = (config.density * total - n_pinned) / (total - n_pinned)
    if density <= 0:
        raise ConfigError(
            f"sparsity {config.sparsity} keeps fewer weights than the {n_pinned} of "
            "the unknown output's row alone; lower --sparsity"
        )
    counts = keep_counts(free, layer_densities(free, density, config.distribution))
    return {n: counts[n] + counted.get(n, 0) for n in shapes}


def keep_pinned_(
    masks: dict[str, torch.Tensor],
    pinned: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
) -> None:
    """Switch on every inactive pinned entry of ``masks`` (in place), each in place of
    the active unpinned entry of smallest ``|w|`` in its layer (the layer's count is
    kept)."""
    for name, row in pinned.items():
        mask = masks[name]
        missing = int((row & ~mask).sum())
        if missing == 0:
            continue
        candidates = mask & ~row
        magnitude = params[name].detach().abs().masked_fill(~candidates, math.inf)
        off = top_k_mask(-magnitude, min(missing, int(candidates.sum())))
        masks[name] = (mask & ~off) | row
