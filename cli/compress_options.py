"""The options of ``moonprune compress``, one annotated type each.

The command's signature (:mod:`moonprune.cli.compress_cmd`) reads ``name: opts.Name =
default``; the help text a user sees with ``--help`` lives here, next to the option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

METHOD_HELP = (
    "Sparse method: rigl, set, gmp (gradual magnitude), magnitude (one-shot), torch-ao, "
    "channel (structured: removes whole channels, faster on CPU), or a plug-in "
    "(see `moonprune methods`)."
)

Checkpoint = Annotated[
    str | None,
    typer.Argument(
        help="Dense checkpoint: a state_dict file (with --arch) or a moonprune model.pt."
    ),
]
Data = Annotated[str | None, typer.Option(help="ID data: digits, digits:0-5, ...")]
Ood = Annotated[
    list[str] | None,
    typer.Option(help="OOD set to evaluate against (repeatable): digits:6-9, noise, ..."),
]
Out = Annotated[str | None, typer.Option(help="Output directory (created; must be new or empty).")]
Arch = Annotated[
    str | None,
    typer.Option(help="Network factory, package.module:callable or file.py:callable."),
]
ArchKwargs = Annotated[
    str | None,
    typer.Option(
        help="Factory keyword arguments as JSON, e.g. '{\"width\": 16}'. "
        "num_classes/in_channels default to the data's."
    ),
]
Method = Annotated[str | None, typer.Option(help=METHOD_HELP)]
Sparsity = Annotated[
    float | None,
    typer.Option(help="Fraction of conv/linear weights set to zero, in (0, 1). Default 0.9."),
]
Epochs = Annotated[int | None, typer.Option(help="Fine-tuning epochs. Default 30.")]
Lr = Annotated[float | None, typer.Option(help="Base learning rate. Default 0.05.")]
BatchSize = Annotated[int | None, typer.Option(help="Batch size. Default 64.")]
Augment = Annotated[
    str | None,
    typer.Option(
        help="Training-row augmentation: none (default), crop (random crop with "
        "padding), crop+flip (natural images)."
    ),
]
MacsTarget = Annotated[
    float | None,
    typer.Option(help="channel: keep this fraction of the dense MACs (instead of --sparsity)."),
]
PruneSteps = Annotated[
    int | None,
    typer.Option(
        help="channel: pruning steps, each followed by fine-tuning. Default min(4, epochs)."
    ),
]
Importance = Annotated[
    str | None, typer.Option(help="channel: magnitude (default) or taylor importance.")
]
RoundTo = Annotated[
    int | None,
    typer.Option(
        help="channel: keep channel counts multiples of this (e.g. 8: faster on "
        "onnxruntime's CPU kernels than odd counts)."
    ),
]
Allocation = Annotated[
    str | None,
    typer.Option(
        help="channel: latency (default: layer widths chosen by timing candidate "
        "networks in onnxruntime on this machine), global (per MAC saved, no timing) "
        "or uniform (every layer loses the same fraction)."
    ),
]
Speedup = Annotated[
    float | None,
    typer.Option(
        help="channel: make the model this many times faster (dense / pruned "
        "onnxruntime latency at --latency-batch, measured on this machine, within "
        "10%). Default with no other target: the least pruning that is at least "
        "1.5x faster at batch 1 and 1.8x at --latency-batch (else the fastest)."
    ),
]
LatencyBatch = Annotated[
    int | None, typer.Option(help="channel: batch size the speed-up is for. Default 64.")
]
LatencyThreads = Annotated[
    int | None,
    typer.Option(help="channel: onnxruntime threads to time with. Default: all CPUs."),
]
Distribution = Annotated[
    str | None, typer.Option(help="Layer densities: erk (default) or uniform.")
]
NoMoon = Annotated[
    bool,
    typer.Option("--no-moon", help="Plain baseline: K-way head, cross-entropy, no averaging."),
]
Unknowns = Annotated[
    str | None,
    typer.Option(
        help="Synthesized 'unknown' training rows (beyond the MOON paper): none "
        "(default; MOON as published), synth (blur+mixup, chosen by the grids in "
        "benchmarks/RESULTS.md), or generator names joined by '+' (patch2, patch4, mixup, "
        "blur, permute, lowfreq, vos)."
    ),
]
UnknownsFraction = Annotated[
    float | None,
    typer.Option(help="Synthesized rows per batch, as a fraction of it. Default 0.125."),
]
UnknownsWeight = Annotated[
    float | None,
    typer.Option(help="Weight of their cross-entropy in the loss. Default 0.1."),
]
UnknownHead = Annotated[
    str | None,
    typer.Option(
        help="The K+1 head: mean (default; MOON as published: the unknown row starts as "
        "the mean known row) or separate (beyond the paper: unknown logit = logsumexp of "
        "the known ones + its own row on detached features; with --unknowns it kept more "
        "accuracy at 95%% sparsity but lost near-OOD AUROC, see README)."
    ),
]
Score = Annotated[
    str | None,
    typer.Option(
        help="OOD score: mahalanobis++ (default), mahalanobis or knn, of the "
        "classifier's input "
        "(fitted on the training split), or of the logits: msp, energy, max_logit, unknown."
    ),
]
Temperature = Annotated[
    str | None,
    typer.Option(help="auto (default): fit T on validation data; or a number (1 = off)."),
]
Tpr = Annotated[
    float | None,
    typer.Option(help="Share of ID inputs the threshold accepts. Default 0.95."),
]
Normalize = Annotated[
    str | None,
    typer.Option(
        help="How the dense model's inputs were normalised: auto (default: the most "
        "accurate on validation data), none ([0, 1]), dataset (the training split's "
        "mean/std), symmetric ([-1, 1]), imagenet, 0-255, or 'mean=..;std=..' on "
        "pixels in [0, 1]."
    ),
]
HeadLayer = Annotated[
    str | None, typer.Option(help="Name of the final nn.Linear (found automatically).")
]
Config = Annotated[
    Path | None,
    typer.Option(help="Recipe TOML with any of these options; flags override it."),
]
Seed = Annotated[
    int | None, typer.Option(help="Random seed (splits, shuffling, growth). Default 0.")
]
Device = Annotated[str | None, typer.Option(help="auto (default), cpu or cuda.")]
NoExport = Annotated[bool, typer.Option("--no-export", help="Skip writing model.onnx.")]
ImageSize = Annotated[
    str | None,
    typer.Option(help="Resize folder images to HxW (e.g. 32x32); default: the first image's size."),
]
Channels = Annotated[
    int | None, typer.Option(help="Convert images to 1 (gray) or 3 (RGB) channels.")
]
OnBadImage = Annotated[
    str | None, typer.Option(help="An undecodable image file: skip (warn) or fail.")
]
Workers = Annotated[
    int | None,
    typer.Option(
        help="Processes that read image-folder batches (decode, resize, normalise) while the "
        "model trains; 0 reads in the main process. Default: one per CPU beyond the first, "
        "at most 4. Results do not depend on it."
    ),
]
MinAuroc = Annotated[float | None, typer.Option(help="Gate: every OOD AUROC >= X (exit 1 if not).")]
MaxFpr95 = Annotated[float | None, typer.Option(help="Gate: every OOD FPR95 <= X.")]
MinAccuracy = Annotated[float | None, typer.Option(help="Gate: accuracy >= X.")]
MaxAccuracyDrop = Annotated[
    float | None, typer.Option(help="Gate: dense - compressed accuracy <= X.")
]
MaxEce = Annotated[float | None, typer.Option(help="Gate: ECE <= X.")]
MaxAurocDrop = Annotated[
    float | None, typer.Option(help="Gate: dense - compressed AUROC <= X per OOD set.")
]
TrustCheckpoint = Annotated[
    bool,
    typer.Option("--trust-checkpoint", help="Allow a pickled nn.Module (can run code!)."),
]
Force = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted run into the same --out.")
]
