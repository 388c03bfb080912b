"""The forward pass with synthesized unknowns: ID rows plus rows made to be class K."""

from __future__ import annotations

import torch

from moonprune.conventions import UNKNOWN_ROW_ATTR
from moonprune.training_state import TrainerState
from moonprune.unknowns import rows_for, synthesize, unknown_head, unknown_loss_sum


class SynthesizedUnknowns(TrainerState):
    """The trainer's forward pass when ``--unknowns`` synthesizes rows (not ``none``)."""

    def _forward_with_unknowns(
        self, x: torch.Tensor, y: torch.Tensor, n_global: int, draws: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the ID rows, and ``weight * mean CE(synthesized rows, K)``.

        Input-space rows are forwarded with the ID rows; feature-space rows are drawn
        from the ID rows' (detached) classifier inputs and go through the classifier
        only. The mean is over the global batch's synthesized rows (``round(fraction *
        n_r)`` per rank), so data-parallel gradients average to the single-process one.
        """
        head = unknown_head(self.model)
        k = int(getattr(head, UNKNOWN_ROW_ATTR))
        fraction, n = self.moon_cfg.unknowns_fraction, len(y)
        m = rows_for(n, fraction)
        world = self.dist.world_size
        m_global = sum(rows_for(len(range(r, n_global, world)), fraction) for r in range(world))
        x_syn = synthesize(self.unknowns, x, y, m, draws, "input")
        features: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
        try:
            logits = self.forward(torch.cat([x, x_syn]) if len(x_syn) else x)
        finally:
            hook.remove()
        synthetic = [logits[n:]]
        f = features[0].flatten(1)[:n].detach()
        f_syn = synthesize(self.unknowns, f, y, m, draws, "feature")
        if len(f_syn):
            synthetic.append(head(f_syn))
        total = unknown_loss_sum(torch.cat(synthetic), k)
        scale = self.moon_cfg.unknowns_weight * (world if self.dist.enabled else 1)
        return logits[:n], total * (scale / max(m_global, 1))
