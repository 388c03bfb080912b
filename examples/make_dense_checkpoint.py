"""Train the demo CNN on digits 0-5 and save its state_dict as dense-digits.pt.

The recipes in this folder start from that file:

    python examples/make_dense_checkpoint.py
    moonprune compress --config examples/rigl.toml
"""

from __future__ import annotations

import sys

import torch

from moonprune.data import load_splits
from moonprune.demo import train_dense
from moonprune.models import demo_cnn


def main(path: str = "dense-digits.pt") -> None:
    splits = load_splits("digits:0-5", seed=0)
    torch.manual_seed(0)
    model = train_dense(demo_cnn(num_classes=6, in_channels=1), splits)
    torch.save(model.state_dict(), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
