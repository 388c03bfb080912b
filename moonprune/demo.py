"""The demo: train a small dense CNN on digits 0-5, then compress it with RigL + MOON.

Everything runs on built-in data (scikit-learn's digits), on the CPU, in well under
two minutes on 2 cores. Held-out digits 6-9 are the open-set OOD data, uniform
noise the sanity floor.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moonprune.batching import iterate_batches, min_rows_per_batch
from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.config import CompressConfig, MoonConfig, SparsityConfig, TrainConfig
from moonprune.data import Splits, load_splits
from moonprune.outputs import MARKER, OutputDir
from moonprune.pipeline import CompressResult, compress
from moonprune.training import TrainCallback

DEMO_DATA = "digits:0-5"
DEMO_OOD = ("digits:6-9", "noise")
DEMO_ARCH = "moonprune.models:demo_cnn"
DEMO_FILES = {
    "dense.pt", "model.pt", "model.onnx", "report.json", "report.html", "recipe.json", MARKER,
}  # fmt: skip


def train_dense(model: nn.Module, splits: Splits, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Plain supervised training (Adam, cross-entropy) of the dense starting point."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    device = next(model.parameters()).device
    model.train()
    for epoch in range(epochs):
        batches = iterate_batches(splits.train, 64, seed * 1000 + epoch, device,
                                  min_last=min_rows_per_batch(model))  # fmt: skip
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def demo_config(
    out: str | Path,
    seed: int = 0,
    epochs: int = 30,
    moon: bool = True,
    method: str = "rigl",
    sparsity: float = 0.9,
) -> CompressConfig:
    """The demo's compress settings (also used by the benchmarks)."""
    return CompressConfig(
        checkpoint="dense.pt",
        data=DEMO_DATA,
        ood=DEMO_OOD,
        out=str(out),
        arch=DEMO_ARCH,
        arch_kwargs={"num_classes": 6, "in_channels": 1},
        train=TrainConfig(epochs=epochs, seed=seed),
        moon=MoonConfig(enabled=moon),
        sparsity=SparsityConfig(method=method, sparsity=sparsity),
    )


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    epochs: int = 30,
    force: bool = False,
    export: bool = True,
    callback: TrainCallback | None = None,
) -> CompressResult:
    """Train the dense model, save it as ``dense.pt``, compress it into ``out``.

    A directory holding only an earlier demo's files is replaced without ``force``, so
    running the demo twice just works; anything else in ``out`` is protected.
    """
    previous = Path(out)
    if previous.is_dir() and {p.name for p in previous.iterdir()} <= DEMO_FILES:
        force = True
    OutputDir(out, force=force)  # refuse a foreign --out before spending time on training
    cfg = demo_config(out, seed=seed, epochs=epochs)
    if not export:
        cfg = CompressConfig(**{**vars(cfg), "export": False})
    arch = ArchSpec(DEMO_ARCH, dict(cfg.arch_kwargs))
    splits = load_splits(DEMO_DATA, seed=seed)
    torch.manual_seed(seed)
    dense = train_dense(arch.build(), splits, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.pt"
        torch.save(dense.state_dict(), dense_path)
        cfg = CompressConfig(**{**vars(cfg), "checkpoint": str(dense_path)})
        result = compress(cfg, callback=callback, force=force, dense=DenseModel(dense, arch))
        shutil.copy(dense_path, result.out / "dense.pt")
    result.files["dense.pt"] = result.out / "dense.pt"
    return result
