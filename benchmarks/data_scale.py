"""Memory and speed of the input pipeline as the data grows (issue 19).

    python benchmarks/data_scale.py [--sizes 4000 16000 64000] [--root DIR]

For each size, a synthetic ImageFolder of 64x64 RGB PNGs (10 classes; generated once
under ``--root``, default a temporary folder, and reused) is compressed by
``moonprune compress`` as a subprocess: a random-init ResNet-8 (width 16), ``--method
magnitude --sparsity 0.5 --epochs 1 --ood noise``, defaults otherwise (export on).
Measured: the peak memory of the process tree (the compress process and its reader
workers; sampled every 50 ms from /proc: the sum of RSS, which counts pages the
workers share with their parent once per process, and the sum of PSS, which counts
them once), the wall time, and the training images/s of the epoch.

Then, on the smallest set and in the same run, the training loop alone (the same
model, masker and settings through :class:`moonprune.Trainer`) trains one epoch
twice: on the folder streamed by worker processes, and on the same rows decoded into
one in-memory tensor first (the path every folder took before the streaming
pipeline). Their images/s are compared; the decoding of the in-memory copy is
timed separately and not counted in its images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from results_file import update_section

SIZE = 64
CLASSES = 10


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 64x64 RGB PNGs in ``root/<class>/``: a class colour and stripe frequency
    plus noise, so the classes can be learnt (made once; reused when complete)."""
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % CLASSES
        colour = np.array([(c * 37) % 255, (c * 91) % 255, (c * 53) % 255], np.float64) / 255
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (c + 1) * (xx * np.cos(c) + yy * np.sin(c)))
        image = 0.6 * stripes[..., None] * colour + 0.4 * rng.random((SIZE, SIZE, 3))
        Image.fromarray((255 * image).astype(np.uint8)).save(root / f"class{c}" / f"{i:06d}.png")
    done.touch()
    return root


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _memory(pids: list[int]) -> tuple[int, int, int]:
    """(sum of RSS, sum of PSS, largest single RSS) in bytes."""
    rss = pss = largest = 0
    for p in pids:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                one = int(line.split()[1]) * 1024
                rss, largest = rss + one, max(largest, one)
            elif line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return rss, pss, largest


def run_compress(folder: Path, ckpt: Path, out: Path) -> dict[str, float]:
    """One ``moonprune compress`` run, its peak tree memory, wall time and images/s."""
    command = [
        sys.executable, "-m", "moonprune", "compress", str(ckpt),
        "--arch", "moonprune.models:resnet8", "--arch-kwargs", '{"num_classes": 10}',
        "--data", str(folder), "--ood", "noise", "--out", str(out),
        "--method", "magnitude", "--sparsity", "0.5", "--epochs", "1",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0, 0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = _memory(_tree(proc.pid))
            peak[:] = [max(a, b) for a, b in zip(peak, now, strict=True)]
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"compress failed ({proc.returncode}): {err.decode()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    n_train = report["data"]["n_train"]
    return {"rss_gb": peak[0] / 1e9, "pss_gb": peak[1] / 1e9, "main_gb": peak[2] / 1e9,
            "wall_s": wall,
            "train_images_s": n_train / report["timing"]["epoch_s_mean"],
            "n_train": n_train}  # fmt: skip


def loop_images_per_s(folder: Path) -> dict[str, float]:
    """Training images/s of one epoch, streamed vs decoded into memory first."""
    import moonprune
    from moonprune.data import ImageSet
    from moonprune.streaming import LazyImages

    splits = moonprune.load_splits(str(folder), seed=0)
    streamed = splits.train
    assert isinstance(streamed.x, LazyImages)
    t0 = time.perf_counter()
    in_memory = ImageSet(streamed.name, streamed.x.materialize(), streamed.y, streamed.classes)
    decode_s = time.perf_counter() - t0
    out = {"decode_s": decode_s, "workers": float(streamed.x.workers)}
    for name, data in (("stream", streamed), ("memory", in_memory), ("stream2", streamed)):
        torch.manual_seed(0)
        model = moonprune.models.resnet8(num_classes=CLASSES)
        masker = moonprune.MASKERS.create("magnitude", moonprune.MaskerConfig(sparsity=0.5))
        trainer = moonprune.Trainer(model, masker, data, moonprune.TrainConfig(epochs=1),
                                    moonprune.MoonConfig(enabled=False))  # fmt: skip
        result = trainer.run()
        out[name] = len(data) / result.history[0].seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000, 64000])
    parser.add_argument("--root", type=Path, help="where the folders are made (and kept)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.gettempdir()) / "moonprune-data-scale"
    import moonprune
    from moonprune.streaming import limit_heap_growth

    limit_heap_growth()  # as the CLI does: the loop comparison below runs in-process
    torch.manual_seed(0)
    ckpt = root / "resnet8.pt"
    root.mkdir(parents=True, exist_ok=True)
    torch.save(moonprune.models.resnet8(num_classes=CLASSES).state_dict(), ckpt)
    rows = []
    started = time.perf_counter()
    for n in args.sizes:
        folder = make_folder(root / f"images{n}", n)
        with tempfile.TemporaryDirectory() as tmp:
            row = run_compress(folder, ckpt, Path(tmp) / "run")
        row["n"] = n
        rows.append(row)
        print(json.dumps(row), flush=True)
    loop = loop_images_per_s(root / f"images{min(args.sizes)}")
    print(json.dumps(loop), flush=True)
    cpus = len(os.sched_getaffinity(0))
    lines = [
        f"### Input pipeline: memory and speed vs data size ({cpus} CPUs)",
        "",
        "`moonprune compress` on synthetic 64x64 RGB ImageFolders (10 classes), random-init "
        "ResNet-8, `--method magnitude --sparsity 0.5 --epochs 1 --ood noise`, export on; "
        f"default `--workers` ({int(loop['workers'])} here). Peak memory of the process tree, "
        "sampled every 50 ms: RSS summed over the processes (pages shared with the reader "
        "workers counted once per process), PSS (counted once: the tree's real use) and "
        "the largest single process's RSS.",
        "",
        "| images | train rows | peak PSS | peak RSS (sum) | largest process | wall time | "
        "training images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['n_train']:,} | {r['pss_gb']:.2f} GB | {r['rss_gb']:.2f} GB | "
            f"{r['main_gb']:.2f} GB | {r['wall_s']:.0f} s | {r['train_images_s']:.0f} |"
        )
    n_min = min(args.sizes)
    lines += [
        "",
        f"Training loop alone on the {n_min:,}-image folder (same model and settings, one "
        "epoch, this run): streamed by the reader workers "
        f"**{loop['stream']:.0f} images/s** (again after the in-memory run: "
        f"{loop['stream2']:.0f}); decoded into one in-memory tensor first "
        f"**{loop['memory']:.0f} images/s** (the decoding took {loop['decode_s']:.1f} s more, "
        "not counted).",
        "",
        f"Command: `python benchmarks/data_scale.py --sizes {' '.join(map(str, args.sizes))}`; "
        f"wall time {(time.perf_counter() - started) / 60:.1f} min (folders made beforehand).",
    ]
    update_section("data-scale", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
