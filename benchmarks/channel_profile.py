"""Where a channel-pruned network's time goes in onnxruntime, op type by op type.

    python benchmarks/channel_profile.py [--arch resnet8] [--keep 0.3] [--grid 8]

Issue 20 asks for >= 1.5x at batch 1 and >= 1.8x at batch 64 from channel pruning.
This prunes a freshly initialised built-in network (weights do not change the
timing) with the MAC-aware global allocation to ``--keep`` of the dense MACs on a
``--grid`` of channels, exports both bare networks, and runs onnxruntime's profiler
(1 thread) at batch 1 and 64: wall time, the summed kernel time, each op type's share
and each op type's speed-up. Shares and per-op ratios hold on a busy machine; the
absolute times do not. Written into benchmarks/RESULTS.md, section channel-profile.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from results_file import update_section

from moonprune import models
from moonprune.heads import find_classifier
from moonprune.sparsity.channel.pruner import ChannelPruner
from moonprune.sparsity.channel.structure import layer_widths
from moonprune.speed import nchwc_block

RUNS = 30


def profile(path: Path, batch: int) -> tuple[float, collections.Counter[str]]:
    """Fastest of RUNS runs (s) and the kernel microseconds per op type (all runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(f".b{batch}"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    by_op: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    return min(times), by_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--keep", type=float, default=0.3, help="MAC fraction kept")
    parser.add_argument("--grid", type=int, default=8, help="channels per pruning chunk")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = getattr(models, args.arch)(num_classes=6, in_channels=1).eval()
    x = torch.randn(64, 1, 28, 28)
    pruned = copy.deepcopy(dense)
    pruner = ChannelPruner(pruned, x[:2], find_classifier(pruned, x[:2]), keep=args.keep,
                           measure="macs", steps=1, allocation="global",
                           round_to=args.grid)  # fmt: skip
    pruner.step()
    pruned.eval()
    lines = [
        f"## Channel pruning, op by op: {args.arch}, {args.keep:.0%} MACs kept, grid {args.grid}",
        "",
        f"Command: `python benchmarks/channel_profile.py --arch {args.arch} --keep {args.keep} "
        f"--grid {args.grid}`  ",
        f"Machine: {platform.platform()}, onnxruntime {ort.__version__}, 1 thread, NCHWc "
        f"block {nchwc_block()}. MACs kept: {pruner.stats()['macs_fraction']:.1%}; widths "
        f"{layer_widths(pruned)}.",
        "",
        "| batch | dense ms | pruned ms | speed-up | kernel-sum speed-up | op: dense share -> "
        "pruned share (op speed-up) |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "pruned": Path(tmp) / "pruned.onnx"}
        for name, model in (("dense", dense), ("pruned", pruned)):
            torch.onnx.export(model, (x[:1],), str(paths[name]), input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}},
                              dynamo=False)  # fmt: skip
        for batch in (1, 64):
            td, dense_ops = profile(paths["dense"], batch)
            tp, pruned_ops = profile(paths["pruned"], batch)
            total_d, total_p = sum(dense_ops.values()), sum(pruned_ops.values())
            ops = "; ".join(
                f"{op} {100 * dense_ops[op] / total_d:.0f}% -> "
                f"{100 * pruned_ops[op] / total_p:.0f}% ({dense_ops[op] / pruned_ops[op]:.2f}x)"
                for op, _ in dense_ops.most_common(4) if pruned_ops[op]
            )  # fmt: skip
            lines.append(f"| {batch} | {1e3 * td:.2f} | {1e3 * tp:.2f} | {td / tp:.2f}x | "
                         f"{total_d / total_p:.2f}x | {ops} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    update_section(f"channel-profile-{args.arch}-{args.grid}", text)
    print(text)


if __name__ == "__main__":
    main()
