"""Run every hostile / unlucky input of issue 14 through the real CLI; write the table.

Each case runs ``python -m moonprune ...`` as a subprocess in a scratch folder and
records the exit code, the last line on stderr, and whether anything was created or
deleted that should not have been. The table goes to ``docs/hostile-cases.md``.

    python benchmarks/hostile_cases.py            # about 4 minutes on 2 CPU cores
    python benchmarks/hostile_cases.py --check    # also exit 1 when a case misbehaves

Expected: exit 2 and one line for bad input, exit 1 only for a failed gate, never a
traceback, the attacker's marker file never created, inputs never deleted.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
ARCH = "moonprune.models:demo_cnn"


@dataclass
class Case:
    name: str
    args: list[str]
    expect: int = 2
    setup: Callable[[Path], None] | None = None
    must_survive: tuple[str, ...] = ()  # paths (relative to the scratch folder) kept
    must_not_exist: tuple[str, ...] = ()
    one_line: bool = True  # False where progress (e.g. rollback warnings) precedes the error


def _workspace(ws: Path) -> None:
    """dense.pt, data.npz and a finished run (run/model.pt, run/model.onnx)."""
    from moonprune.config import build_config
    from moonprune.models import demo_cnn
    from moonprune.pipeline import compress

    torch.manual_seed(0)
    torch.save(demo_cnn(num_classes=3, width=4).state_dict(), ws / "dense.pt")
    rng = np.random.default_rng(0)
    np.savez(ws / "data.npz", x=rng.random((90, 1, 8, 8), dtype=np.float32),
             y=np.repeat(np.arange(3), 30))  # fmt: skip
    compress(build_config({
        "checkpoint": str(ws / "dense.pt"), "arch": ARCH, "arch_kwargs": {"width": 4},
        "data": "digits:0-2", "ood": ["noise"], "out": str(ws / "run"),
        "train": {"epochs": 1}, "moon": {"warmup_epochs": 0},
    }))  # fmt: skip


def _tamper(name: str, **fields: object) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        obj = torch.load(ws / "run" / "model.pt", weights_only=True)
        for key, value in fields.items():  # a run record field where it lives
            (obj["run"] if key in obj["run"] else obj)[key] = value
        torch.save(obj, ws / name)

    return make


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return make


def _npz(name: str, **arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda ws: np.savez(ws / name, **arrays)  # type: ignore[arg-type]


def _compress(
    *extra: str, data: str = "digits:0-2", out: str = "out", kwargs: str = '{"width": 4}'
) -> list[str]:
    return ["compress", "dense.pt", "--arch", ARCH, "--arch-kwargs", kwargs,
            "--data", data, "--out", out, "--epochs", "1", "--no-export", *extra]  # fmt: skip


def _cases() -> list[Case]:
    pwn = {"factory": "os:system", "kwargs": {"command": "touch PWNED"}}
    x8 = np.zeros((30, 1, 8, 8), dtype=np.float32)
    y3 = np.repeat(np.arange(3), 10)
    return [
        # 1. code named inside a file
        *(Case(f"checkpoint names os:system ({cmd})", args, setup=_tamper("evil.pt", arch=pwn),
               must_not_exist=("PWNED",))
          for cmd, args in (("inspect", ["inspect", "evil.pt"]), ("verify", ["verify", "evil.pt"]),
                            ("export", ["export", "evil.pt", "--out", "e.onnx"]),
                            ("compress", ["compress", "evil.pt", "--data", "digits:0-2",
                                          "--out", "out", "--no-export"]))),
        Case("recipe names a .py file's factory",
             ["compress", "dense.pt", "--config", "evil.toml", "--data", "digits:0-2",
              "--out", "out", "--no-export"],
             setup=lambda ws: (ws / "evil.py").write_text("open('PWNED','w')\ndef net(): pass\n")
             or (ws / "evil.toml").write_text('arch = "evil.py:net"\n'),
             must_not_exist=("PWNED",)),
        # 2. --force and inputs
        Case("--out . --force", _compress("--force", data="data.npz", out="."),
             must_survive=("dense.pt", "data.npz")),
        Case("--out .. --force", _compress("--force", data="data.npz", out=".."),
             must_survive=("dense.pt", "data.npz")),
        Case("--out the data folder --force", _compress("--force", data="imgs", out="imgs"),
             setup=_write("imgs/a/x.txt", "not an image"), must_survive=("imgs/a/x.txt",)),
        Case("--force on a folder moonprune did not write", _compress("--force", out="mine"),
             setup=_write("mine/notes.txt", "keep"), must_survive=("mine/notes.txt",)),
        # 3. int8 and NaN rows: see the row written by _int8_nan_row
        # 4. tampered checkpoint fields
        *(Case(f"checkpoint {label} ({cmd})", [cmd, "bad.pt", *extra], setup=_tamper("bad.pt", **f))
          for label, f in (("threshold 5.0", {"threshold": 5.0}),
                           ("threshold NaN", {"threshold": float("nan")}),
                           ("temperature -1", {"temperature": -1.0}),
                           ("classes = 5", {"classes": 5}),
                           ("arch as a string", {"arch": ARCH}),
                           ("format version 99", {"format_version": 99}))
          for cmd, extra in (("verify", []), ("export", ["--out", "b.onnx"]), ("inspect", []))),
        # 5, 6. resume and two runs
        Case("--resume with no interrupted run", _compress("--resume")),
        Case("a second run on a locked --out", _compress(out="busy"), setup=_hold_lock),
        Case("--resume with a pickled train-state", _compress("--resume", out="p"),
             setup=_write(".p.partial/train-state.pt", b"\x80\x04garbage")),
        # 7. gate bounds
        Case("verify --max-fpr95 30", ["verify", "run/model.pt", "--max-fpr95", "30"]),
        Case("verify --max-ece 5", ["verify", "run/model.pt", "--max-ece", "5"]),
        Case("verify --min-auroc 2", ["verify", "run/model.pt", "--min-auroc", "2"]),
        Case("verify --max-ece 0 (a gate that fails)", ["verify", "run/model.pt", "--max-ece", "0"],
             expect=1),
        # 8. outputs over inputs
        Case("export --out run/model.pt", ["export", "run/model.pt", "--out", "run/model.pt"],
             must_survive=("run/model.pt",)),
        Case("verify --json run/model.pt", ["verify", "run/model.pt", "--json", "run/model.pt"],
             must_survive=("run/model.pt",)),
        # 9. bad data, numbers, recipes, paths
        Case("empty npz", _compress(data="e.npz"), setup=_npz("e.npz", x=x8[:0], y=y3[:0])),
        Case("negative labels", _compress(data="n.npz"), setup=_npz("n.npz", x=x8, y=y3 - 1)),
        Case("NaN labels", _compress(data="nan.npz"),
             setup=_npz("nan.npz", x=x8, y=np.full(30, np.nan))),
        Case("float labels 1.5", _compress(data="f.npz"), setup=_npz("f.npz", x=x8, y=y3 + 0.5)),
        Case("2-D y", _compress(data="y2.npz"), setup=_npz("y2.npz", x=x8, y=np.zeros((30, 2)))),
        Case("string pixels", _compress(data="s.npz"),
             setup=_npz("s.npz", x=np.full((30, 1, 8, 8), "a"), y=y3)),
        Case("complex pixels", _compress(data="c.npz"),
             setup=_npz("c.npz", x=x8.astype(np.complex64), y=y3)),
        Case("single-class data", _compress(data="one.npz"),
             setup=_npz("one.npz", x=x8, y=np.zeros(30, dtype=int))),
        Case("--ood ''", _compress("--ood", "")),
        Case("--seed -1", _compress("--seed", "-1")),
        Case("--seed 1e20", _compress("--seed", "1e20")),
        Case("--sparsity 1.5", _compress("--sparsity", "1.5")),
        Case("--normalize 'mean=1;std=0'", _compress("--normalize", "mean=1;std=0")),
        Case("--normalize imagenet on 1-channel data", _compress("--normalize", "imagenet")),
        Case("--augment mixup", _compress("--augment", "mixup")),
        Case("--lr 1e6 (diverges: rolled back, then stops)", _compress("--lr", "1e6"),
             one_line=False),
        Case("--arch-kwargs width -3", _compress(kwargs='{"width": -3}')),
        Case("a factory that raises ValueError",
             ["compress", "dense.pt", "--arch", "raises.py:net", "--data", "digits:0-2",
              "--out", "out", "--no-export"],
             setup=_write("raises.py", "def net(**kw):\n    raise ValueError('bad width')\n")),
        Case("recipe train = 5", _compress("--config", "t.toml"),
             setup=_write("t.toml", "train = 5\n")),
        Case("non-UTF-8 recipe", _compress("--config", "u.toml"),
             setup=_write("u.toml", b"[train]\nlr = 0.1 # \xff\n")),
        Case("--config a folder", _compress("--config", ".")),
        Case("--out under a file", _compress(out="afile/out"), setup=_write("afile", "x")),
        Case("--out name too long", _compress(out="x" * 300)),
        Case("--out a symlink", _compress(out="link"),
             setup=lambda ws: (ws / "real").mkdir() or os.symlink(ws / "real", ws / "link")),
        Case("bench --runs 0", ["bench", "run/model.onnx", "--runs", "0"]),
        Case("bench --batch 0", ["bench", "run/model.onnx", "--batch", "0"]),
        Case("export --quantize int8 into a missing folder",
             ["export", "run/model.pt", "--quantize", "int8", "--out", "nope/m.onnx"]),
        Case("inspect MODEL.ONNX (upper case)", ["inspect", "M.ONNX"], expect=0,
             setup=lambda ws: shutil.copy(ws / "run" / "model.onnx", ws / "M.ONNX")),
        Case("a checkpoint that is a plain pickle", ["inspect", "p.pkl"],
             setup=_write("p.pkl", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.")),
        # 10. a held-out file is evaluated whole
        Case("verify --data another file (a held-out set: all rows)",
             ["verify", "run/model.pt", "--data", "h.npz"], expect=0,
             setup=_npz("h.npz", x=np.random.default_rng(1).random((45, 1, 8, 8)),
                        y=np.repeat(np.arange(3), 15))),
    ]  # fmt: skip


def _hold_lock(ws: Path) -> None:
    handle = (ws / ".busy.lock").open("ab")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(handle)  # held until this script ends, like a running first run


_HELD: list[object] = []


def _run(case: Case, ws: Path) -> dict[str, object]:
    if case.setup is not None:
        case.setup(ws)
    before = {p: (ws / p).read_bytes() for p in case.must_survive if (ws / p).is_file()}
    proc = subprocess.run(
        [sys.executable, "-m", "moonprune", *case.args], cwd=ws, capture_output=True,
        text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    if case.expect == 0:
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()][:1]
    harm = [p for p in case.must_not_exist if (ws / p).exists()]
    harm += [p for p, data in before.items() if not (ws / p).is_file()
             or (ws / p).read_bytes() != data]  # fmt: skip
    ok = (proc.returncode == case.expect and "Traceback" not in proc.stderr and not harm
          and (case.expect == 0 or len(lines) == 1 or not case.one_line))  # fmt: skip
    return {"case": case.name, "command": "moonprune " + " ".join(_quote(a) for a in case.args),
            "exit": proc.returncode, "sees": lines[-1] if lines else "", "ok": ok,
            "harm": harm}  # fmt: skip


def _quote(arg: str) -> str:
    return f"'{arg}'" if not arg or any(c in arg for c in ' {}"') else arg


def _int8_nan_row(ws: Path) -> dict[str, object]:
    """Item 3: the int8 file, fed NaN/inf/huge rows with bare onnxruntime."""
    import onnxruntime as ort

    command = ["export", "run/model.pt", "--quantize", "int8", "--out", "q.onnx"]
    subprocess.run([sys.executable, "-m", "moonprune", *command], cwd=ws, check=True,
                   capture_output=True)  # fmt: skip
    session = ort.InferenceSession(str(ws / "q.onnx"), providers=["CPUExecutionProvider"])
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    for i, value in enumerate((np.nan, np.inf, -np.inf, 3e38)):
        x[i, 0, i, i] = value
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}),
                   strict=True))  # fmt: skip
    ok = bool((out["label"] == -1).all() and out["is_unknown"].all())
    return {"case": "int8 ONNX fed NaN, +inf, -inf, 3e38 rows", "ok": ok, "exit": 0,
            "command": "onnxruntime on `moonprune export run/model.pt --quantize int8`",
            "sees": f"label {out['label'].tolist()}, is_unknown {out['is_unknown'].tolist()}",
            "harm": []}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a case misbehaves")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "hostile-cases.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _workspace(base)
        rows.append(_int8_nan_row(base))
        for i, case in enumerate(_cases()):
            ws = Path(tmp) / f"c{i}" / "ws"  # a parent of its own, so `--out ..` harms nothing else
            ws.parent.mkdir()
            subprocess.run(["cp", "-a", str(base), str(ws)], check=True)
            rows.append(_run(case, ws))
            print(f"{'ok ' if rows[-1]['ok'] else 'BAD'} {case.name}", flush=True)
    bad = [r for r in rows if not r["ok"]]
    table = [
        "| case | command | exit | what the user sees | as expected |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        sees = str(r["sees"]).replace("|", "\\|")
        table.append(f"| {r['case']} | `{r['command']}` | {r['exit']} | {sees} | "
                     f"{'yes' if r['ok'] else 'NO ' + str(r['harm'])} |")  # fmt: skip
    args.out.write_text(
        "# Hostile and unlucky inputs\n\n"
        "Generated by `python benchmarks/hostile_cases.py` (each case runs the real CLI in a\n"
        "scratch copy of a workspace holding `dense.pt`, `data.npz` and a finished `run/`).\n"
        "Expected: exit 2 and one line for bad input, 1 only for a failed gate, 0 where the\n"
        "input is fine; no traceback; a marker file a hostile file tries to create never\n"
        "exists; inputs are never deleted or overwritten.\n\n"
        f"{len(rows) - len(bad)} of {len(rows)} cases as expected.\n\n" + "\n".join(table) + "\n"
    )
    print(f"wrote {args.out}: {len(rows) - len(bad)} of {len(rows)} as expected")
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
