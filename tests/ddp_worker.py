"""Run by tests/test_distributed.py under torchrun (or alone): train, dump per-rank state.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py \
        OUT_DIR full|interrupt|resume [BATCH_SIZE]

``DDP_DATA`` (an image folder) replaces the built-in digits, so the streaming input
path is the one trained on; ``DDP_AUGMENT`` sets the augmentation; ``DDP_UNKNOWNS``
the synthesized unknowns (``--unknowns``, default ``none``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from moonprune.config import MoonConfig, TrainConfig
from moonprune.data import load_splits
from moonprune.distributed import from_env, shutdown
from moonprune.heads import add_unknown_output_
from moonprune.models import mlp_biasfree
from moonprune.sparsity import MASKERS, MaskerConfig
from moonprune.training import StopTraining, Trainer


def main(out: Path, mode: str, batch_size: int = 64) -> None:
    dist = from_env()
    splits = load_splits(os.environ.get("DDP_DATA", "digits:0-5"), seed=0)
    torch.manual_seed(0)
    model = mlp_biasfree(num_classes=6)
    add_unknown_output_(model, splits.train.x[:2])
    masker = MASKERS.create("set", MaskerConfig(sparsity=0.8, update_interval=3, seed=5))
    augment = os.environ.get("DDP_AUGMENT", "none")
    trainer = Trainer(model, masker, splits.train,
                      TrainConfig(epochs=4, batch_size=batch_size, augment=augment),
                      MoonConfig(warmup_epochs=1, average_epochs=1,
                                 unknowns=os.environ.get("DDP_UNKNOWNS", "none")),
                      state_path=out / "state.pt", dist=dist)  # fmt: skip
    if mode == "resume":
        trainer.load_state(out / "state.pt")
    try:
        result = trainer.run(stop_after_epoch=1 if mode == "interrupt" else None)
    except StopTraining:
        return
    assert trainer.schedule is not None
    torch.save(
        {
            "masks": result.masks,
            "state": result.model.state_dict(),
            "updates": masker.updates,
            "schedule": trainer.schedule.state_dict(),
            "epoch_loss": [h.loss for h in result.history],
            "n_train": len(splits.train),
            "unknown_rate": [h.unknown_rate for h in result.history],
        },
        out / f"{mode}-rank{dist.rank}.pt",
    )


if __name__ == "__main__":
    finished = False
    try:
        main(Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:]))
        finished = True
    finally:
        shutdown(finished)  # as a torchrun script should before it exits
