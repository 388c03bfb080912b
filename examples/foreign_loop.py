"""MOON inside your own PyTorch training loop (no moonprune trainer).

    python examples/foreign_loop.py            # about 10 s on 2 CPU cores
    python examples/foreign_loop.py --smoke    # CI: fewer epochs

What it shows: the four MOON parts as plain objects in a hand-written loop --
``add_unknown_output_`` (K+1 head), a masker (RigL here), ``MoonSchedule`` (the
unknown-aware loss and the auto-tuned ``a``), ``WeightAveraging`` -- and
``moonprune.assess`` for the reliability report at the end.

How it differs from ``moonprune compress`` with the same settings (digits 0-5,
RigL 90%, 30 epochs, SGD lr 0.05, batch 64, 5 warm-up epochs, last 20% averaged):
this loop shuffles with a ``DataLoader`` and uses torch's ``CosineAnnealingLR`` per
epoch (factor 1 -> 0.08) instead of moonprune's per-step schedule from 1.2, so the
weights differ. The test ``tests/test_foreign_loop.py`` runs both and requires the
results to agree within a stated tolerance: accuracy within 3 points and mean AUROC
over the OOD sets within 5 points.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import moonprune
from moonprune.demo import train_dense


def run(epochs: int = 30, seed: int = 0) -> dict[str, Any]:
    """Train with MOON in a plain loop; return the compressed model's report row."""
    torch.manual_seed(seed)
    splits = moonprune.load_splits("digits:0-5", seed=seed)
    ood = {
        s: moonprune.load_ood(s, splits.preprocessing, seed=seed) for s in ("digits:6-9", "noise")
    }
    model = train_dense(moonprune.models.demo_cnn(num_classes=6), splits, seed=seed)

    # 1. the unknown output (index K)
    moonprune.add_unknown_output_(model, splits.train.x[:2])
    # 2. your optimizer, a masker, MOON's schedule and the averaging policy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)  # fmt: skip
    average_from = epochs - max(1, round(0.2 * epochs))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, average_from, eta_min=0.004)
    loader = DataLoader(TensorDataset(splits.train.x, splits.train.y), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    steps = epochs * len(loader)
    masker = moonprune.MASKERS.create("rigl", moonprune.MaskerConfig(sparsity=0.9, seed=seed))
    end_step = min(int(0.75 * steps), average_from * len(loader))  # freeze before averaging
    masker.prepare(model, moonprune.TopologySchedule(steps, end_step, len(loader)), optimizer)
    schedule = moonprune.MoonSchedule(moonprune.MoonScheduleConfig(total_epochs=epochs))
    averaging = moonprune.WeightAveraging(start_epoch=average_from)

    for epoch in range(epochs):
        model.train()
        for step, (x, y) in enumerate(loader):
            loss = schedule.loss(model(x), y, epoch)  # cross-entropy in warm-up, then MOON
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            masker.step()  # RigL reads the dense gradient, then re-applies the masks
            averaging.maybe_update(model, epoch, step, len(loader))
        schedule.end_epoch(epoch)
        averaging.end_epoch(epoch, (x for x, _ in loader))  # BatchNorm of the average
        if epoch < average_from:
            scheduler.step()
    masker.finalize()
    final = averaging.result() or model
    result = moonprune.assess(final.eval(), splits, ood, temperature="auto")
    return {**result.metrics, "threshold": result.threshold, "temperature": result.temperature,
            "lr_at_end": optimizer.param_groups[0]["lr"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="8 epochs instead of 30")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    row = run(epochs=8 if args.smoke else 30, seed=args.seed)
    print(f"accuracy {100 * row['accuracy']:.2f}%  ECE {100 * row['ece']:.2f}%")
    for name, m in row["ood"].items():
        print(f"AUROC vs {name}: {100 * m['auroc']:.2f}  FPR95 {100 * m['fpr95']:.2f}")
    assert math.isfinite(row["threshold"])


if __name__ == "__main__":
    main()
