"""Run by tests/test_distributed.py under torchrun (or alone): ``--method channel`` with
the latency allocation, timing modelled (``tests/fake_timer.py``).

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/ddp_channel_worker.py DENSE_PT OUT_DIR

Each process that times candidates leaves ``OUT_DIR.timed-rank<RANK>`` beside OUT_DIR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from fake_timer import modelled_speedups  # tests/ is this script's folder

import moonprune.speed
from moonprune.config import build_config
from moonprune.distributed import shutdown
from moonprune.pipeline import compress


def main(dense: Path, out: Path) -> None:
    mark = out.with_name(f"{out.name}.timed-rank{os.environ.get('RANK', '0')}")

    def timer(*args: Any, **kwargs: Any) -> dict[str, dict[int, float]]:
        mark.touch()
        return modelled_speedups(*args, **kwargs)

    moonprune.speed.time_speedups = timer  # type: ignore[assignment]
    compress(build_config({
        "checkpoint": str(dense), "arch": "moonprune.models:mlp_biasfree",
        "data": "digits:0-5", "ood": ["noise"], "out": str(out), "export": False,
        "train": {"epochs": 2}, "moon": {"warmup_epochs": 1},
        "sparsity": {"method": "channel", "sparsity": 0.5, "steps": 2},
    }))  # fmt: skip


if __name__ == "__main__":
    finished = False
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
        finished = True
    finally:
        shutdown(finished)  # as a torchrun script should before it exits
