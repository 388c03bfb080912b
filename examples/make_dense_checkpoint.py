"""Train a dense demo CNN on a built-in data set and save its state_dict.

The recipes in this folder start from such a file:

    python examples/make_dense_checkpoint.py                       # digits 0-5
    moonprune compress --config examples/rigl.toml

    python examples/make_dense_checkpoint.py --data mnist5k:0-5 --out dense-mnist.pt
    moonprune compress dense-mnist.pt --arch moonprune.models:demo_cnn \\
        --data mnist5k:0-5 --ood mnist5k:6-9 --ood textures --ood photos --out runs/mnist
"""

from __future__ import annotations

import argparse

import torch

from moonprune.data import load_splits
from moonprune.demo import train_dense
from moonprune.models import demo_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits:0-5")
    parser.add_argument("--out", default="dense-digits.pt")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    splits = load_splits(args.data, seed=args.seed)
    torch.manual_seed(args.seed)
    model = demo_cnn(num_classes=splits.num_classes, in_channels=splits.preprocessing.channels)
    model = train_dense(model, splits, epochs=args.epochs, seed=args.seed)
    accuracy = (model(splits.test.x).argmax(1) == splits.test.y).float().mean().item()
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out} (test accuracy {100 * accuracy:.2f}%)")


if __name__ == "__main__":
    main()
