"""Issue 14 (hardening): a file never runs code, --force never eats an input, a resumed
run cannot change its settings, two runs cannot share an --out, gates are fractions,
outputs never overwrite inputs, verify evaluates a held-out file whole, and every bad
input is one line with exit code 2 (an internal error is exit 3, never 1)."""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from moonprune.cli.app import app
from typer.testing import CliRunner, Result

from moonprune.checkpoints import load_checkpoint
from moonprune.config import build_config
from moonprune.errors import CheckpointError
from moonprune.models import demo_cnn
from moonprune.pipeline import compress

runner = CliRunner()
ARCH = "moonprune.models:demo_cnn"


def _one_line_exit_2(result: Result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(small_run: Path) -> Path:
    """``dense.pt`` and ``run/model.pt`` of a 1-epoch compress (conftest)."""
    return small_run


def _tampered(run_dir: Path, tmp_path: Path, **fields: Any) -> Path:
    """model.pt with ``fields`` replaced where they live: the run record's in it."""
    obj = torch.load(run_dir / "run" / "model.pt", weights_only=True)
    for key, value in fields.items():
        (obj["run"] if key in obj["run"] else obj)[key] = value
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    return path


# -- 1. a checkpoint or a recipe never names code that runs -------------------------------


def _hostile(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    pwned = tmp_path / "PWNED"
    arch = {"factory": "os:system", "kwargs": {"command": f"touch {pwned}"}}
    return _tampered(run_dir, tmp_path, arch=arch), pwned


@pytest.mark.parametrize("command", ["inspect", "verify", "export", "compress"])
def test_checkpoint_factory_is_never_called(run_dir: Path, tmp_path: Path, command: str) -> None:
    model, pwned = _hostile(run_dir, tmp_path)
    args = {
        "inspect": ["inspect", str(model)],
        "verify": ["verify", str(model)],
        "export": ["export", str(model), "--out", str(tmp_path / "m.onnx")],
        "compress": ["compress", str(model), "--data", "digits:0-2", "--ood", "noise",
                     "--out", str(tmp_path / "out"), "--epochs", "1", "--no-export"],
    }[command]  # fmt: skip
    result = runner.invoke(app, args)
    _one_line_exit_2(result, "--arch os:system")
    assert not pwned.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


def test_library_load_refuses_a_recorded_foreign_factory(run_dir: Path, tmp_path: Path) -> None:
    model, pwned = _hostile(run_dir, tmp_path)
    with pytest.raises(CheckpointError, match="never calls code named inside a file"):
        load_checkpoint(model)
    assert not pwned.exists()


def test_recipe_arch_must_be_named_on_the_command_line(run_dir: Path, tmp_path: Path) -> None:
    pwned = tmp_path / "PWNED"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(pwned)!r}, 'w').close()\ndef net(**kw): pass\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'arch = "{evil}:net"\n')
    result = runner.invoke(app, [
        "compress", str(run_dir / "dense.pt"), "--config", str(recipe), "--data",
        "digits:0-2", "--out", str(tmp_path / "out"), "--no-export",
    ])  # fmt: skip
    _one_line_exit_2(result, f"--arch {evil}:net")
    assert not pwned.exists()


def test_a_factory_of_your_own_loads_with_arch(own_factory_run: Path) -> None:
    """The user's own network: refused without --arch, loaded with it."""
    with pytest.raises(CheckpointError, match="--arch mynets:net"):
        load_checkpoint(own_factory_run)
    assert load_checkpoint(own_factory_run, arch="mynets:net").num_known == 3
    result = runner.invoke(app, ["inspect", str(own_factory_run), "--arch", "mynets:net"])
    assert result.exit_code == 0, result.output


# -- 2. --force never touches what moonprune did not write --------------------------------


def _inputs_in(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(demo_cnn(num_classes=3, width=4).state_dict(), folder / "dense.pt")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.random((60, 1, 8, 8), dtype=np.float32),
             y=np.repeat(np.arange(3), 20))  # fmt: skip
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("out", [".", "..", "data-folder", "checkpoint-folder"])
def test_force_never_deletes_inputs(tmp_path: Path, monkeypatch, out: str) -> None:
    work = tmp_path / "work"
    before = _inputs_in(work)
    monkeypatch.chdir(work)
    target = {"data-folder": str(work), "checkpoint-folder": str(work)}.get(out, out)
    result = runner.invoke(app, [
        "compress", "dense.pt", "--arch", ARCH, "--arch-kwargs", '{"width": 4}',
        "--data", "data.npz", "--out", target, "--force", "--epochs", "1", "--no-export",
    ])  # fmt: skip
    _one_line_exit_2(result, "which moonprune must not replace")
    assert sorted(p.name for p in work.iterdir()) == before


def test_force_replaces_only_a_folder_moonprune_wrote(run_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    result = runner.invoke(app, [
        "compress", str(run_dir / "dense.pt"), "--arch", ARCH, "--arch-kwargs",
        '{"width": 4}', "--data", "digits:0-2", "--out", str(foreign), "--force",
        "--epochs", "1", "--no-export",
    ])  # fmt: skip
    _one_line_exit_2(result, "--force replaces only a folder moonprune wrote")
    assert (foreign / "notes.txt").read_text() == "keep"


# -- 5, 6. resume compares settings; one run per --out ------------------------------------


def test_resume_with_other_settings_is_refused(run_dir: Path, tmp_path: Path) -> None:
    from moonprune.training import StopTraining, Trainer

    base = {
        "checkpoint": str(run_dir / "dense.pt"), "arch": ARCH, "arch_kwargs": {"width": 4},
        "data": "digits:0-2", "out": str(tmp_path / "r"), "export": False,
        "train": {"epochs": 3}, "moon": {"warmup_epochs": 0},
    }  # fmt: skip
    original = Trainer.run
    Trainer.run = lambda self, stop_after_epoch=None: original(self, stop_after_epoch=0)  # type: ignore[method-assign]
    try:
        with pytest.raises(StopTraining):
            compress(build_config(base))
    finally:
        Trainer.run = original  # type: ignore[method-assign]
    args = ["compress", str(run_dir / "dense.pt"), "--arch", ARCH, "--arch-kwargs",
            '{"width": 4}', "--data", "digits:0-2", "--out", str(tmp_path / "r"),
            "--epochs", "3", "--no-export", "--resume",
            "--config", str(_warmup0(tmp_path))]  # fmt: skip
    result = runner.invoke(app, [*args, "--sparsity", "0.5"])
    _one_line_exit_2(result, "sparsity.sparsity was 0.9 in the interrupted run and is 0.5 now")
    result = runner.invoke(app, [*args, "--method", "set"])
    _one_line_exit_2(result, "sparsity.method was 'rigl'")
    # a damaged training state is one line too, never a traceback
    (tmp_path / ".r.partial" / "train-state.pt").write_bytes(b"\x80\x04garbage")
    result = runner.invoke(app, args)
    _one_line_exit_2(result, "is damaged or not moonprune's")


def _warmup0(tmp_path: Path) -> Path:
    path = tmp_path / "w0.toml"
    path.write_text("[moon]\nwarmup_epochs = 0\n")
    return path


def test_a_second_run_on_the_same_out_stops(run_dir: Path, tmp_path: Path) -> None:
    lock = (tmp_path / ".busy.lock").open("ab")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first run holds
    try:
        result = runner.invoke(app, [
            "compress", str(run_dir / "dense.pt"), "--arch", ARCH, "--arch-kwargs",
            '{"width": 4}', "--data", "digits:0-2", "--out", str(tmp_path / "busy"),
            "--epochs", "1", "--no-export",
        ])  # fmt: skip
    finally:
        lock.close()
    _one_line_exit_2(result, "another moonprune run is writing")
    assert not (tmp_path / "busy").exists() and not (tmp_path / ".busy.partial").exists()


# -- 7, 8. gates are fractions; outputs never overwrite inputs ----------------------------


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--max-fpr95", "30", "did you mean 0.30?"), ("--max-ece", "5", "did you mean 0.05?"),
     ("--min-auroc", "2", "must be a fraction in [0, 1]")],
)  # fmt: skip
def test_gate_bounds_outside_0_1_are_refused(
    run_dir: Path, flag: str, value: str, needle: str
) -> None:
    result = runner.invoke(app, ["verify", str(run_dir / "run" / "model.pt"), flag, value])
    _one_line_exit_2(result, needle)


def test_verify_json_never_overwrites_the_checkpoint(run_dir: Path) -> None:
    model = run_dir / "run" / "model.pt"
    before = model.read_bytes()
    result = runner.invoke(app, ["verify", str(model), "--json", str(model)])
    _one_line_exit_2(result, "never writes over what it reads")
    assert model.read_bytes() == before


# -- 4, 9. tampered fields and other bad input: one line, exit 2 --------------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [({"threshold": 5.0}, "threshold 5.0"), ({"threshold": math.nan}, "threshold nan"),
     ({"temperature": -1.0}, "temperature -1.0"), ({"classes": 5}, "'classes' must be"),
     ({"arch": "moonprune.models:demo_cnn"}, "architecture record is damaged"),
     ({"format_version": 99}, "format version 99"),
     ({"unknown_head": "median"}, "unknown_head 'median' must be 'mean' or 'separate'"),
     ({"preprocessing": {"channels": 1}}, "preprocessing record is damaged")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["verify", "export", "inspect"])
def test_tampered_checkpoint_fields(
    run_dir: Path, tmp_path: Path, fields: dict[str, Any], needle: str, command: str
) -> None:
    model = _tampered(run_dir, tmp_path, **fields)
    extra = ["--out", str(tmp_path / "m.onnx")] if command == "export" else []
    result = runner.invoke(app, [command, str(model), *extra])
    _one_line_exit_2(result, needle)
    assert not (tmp_path / "m.onnx").exists()


def _compress_args(run_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["compress", str(run_dir / "dense.pt"), "--arch", ARCH, "--data", "digits:0-2",
            "--out", str(tmp_path / "out"), "--epochs", "1", "--no-export", *extra]  # fmt: skip


def _raising_factory(tmp_path: Path) -> str:
    (tmp_path / "raising.py").write_text(
        "def net(**kw):\n    raise ValueError('width must be positive')\n"
    )
    return f"{tmp_path / 'raising.py'}:net"


@pytest.mark.parametrize(
    ("case", "needle"),
    [("seed -1", "seed must be an integer in [0, 2**32)"),
     ("width -3", "raised"), ("factory raises", "raised ValueError: width must be positive"),
     ("train = 5", "[train] in the recipe must be a table"),
     ("batch_size = 2.5", "batch_size in [train] must be int"),
     ("non-UTF-8 recipe", "is not UTF-8 text"), ("recipe is a folder", "is a folder"),
     ("out under a file", "is a file, not a folder"), ("out too long", "longer than"),
     ("out is a symlink", "is a symbolic link"),
     ("unknown head median", "unknown_head must be mean or separate, got 'median'")],
)  # fmt: skip
def test_bad_input_is_one_line(run_dir: Path, tmp_path: Path, case: str, needle: str) -> None:
    recipe = tmp_path / "r.toml"
    extra: list[str] = ["--arch-kwargs", '{"width": 4}']
    if case == "seed -1":
        extra += ["--seed", "-1"]
    elif case == "width -3":
        extra = ["--arch-kwargs", '{"width": -3}']
    elif case == "factory raises":
        extra = ["--arch", _raising_factory(tmp_path)]
    elif case in ("train = 5", "batch_size = 2.5"):
        recipe.write_text("train = 5\n" if case == "train = 5" else "[train]\nbatch_size = 2.5\n")
        extra += ["--config", str(recipe)]
    elif case == "non-UTF-8 recipe":
        recipe.write_bytes(b"[train]\nepochs = 1 # \xff\xfe\n")
        extra += ["--config", str(recipe)]
    elif case == "recipe is a folder":
        extra += ["--config", str(tmp_path)]
    elif case == "unknown head median":
        extra += ["--unknown-head", "median"]
    args = _compress_args(run_dir, tmp_path, *extra)
    if case == "out under a file":
        (tmp_path / "afile").write_text("x")
        args[args.index("--out") + 1] = str(tmp_path / "afile" / "out")
    elif case == "out too long":
        args[args.index("--out") + 1] = str(tmp_path / ("x" * 300))
    elif case == "out is a symlink":
        (tmp_path / "real").mkdir()
        os.symlink(tmp_path / "real", tmp_path / "link")
        args[args.index("--out") + 1] = str(tmp_path / "link")
    result = runner.invoke(app, args)
    _one_line_exit_2(result, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_unwritable_out_fails_before_evaluation(run_dir: Path, tmp_path: Path, monkeypatch):
    import moonprune.pipeline as pipeline

    if os.geteuid() == 0:  # root writes anywhere: make the check see a read-only folder
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m: False if "ro" in str(p) else real_access(p, m)
        )
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    monkeypatch.setattr(pipeline, "_assess", lambda *a, **k: pytest.fail("evaluated first"))
    args = _compress_args(run_dir, tmp_path, "--arch-kwargs", '{"width": 4}')
    args[args.index("--out") + 1] = str(tmp_path / "ro" / "out")
    _one_line_exit_2(runner.invoke(app, args), "is not writable")


def test_an_internal_error_is_exit_3_not_1(run_dir: Path, monkeypatch) -> None:
    import moonprune.verification as verification

    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(verification, "assess", bug)
    result = runner.invoke(app, ["verify", str(run_dir / "run" / "model.pt")])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "internal error: ZeroDivisionError" in lines[0]
    assert "--debug" in lines[0]


# -- 10. a held-out data file is evaluated whole -------------------------------------------


def test_verify_on_another_file_evaluates_all_of_it(run_dir: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from moonprune.verification import verify

    digits = load_digits()
    keep = digits.target < 3
    y = digits.target[keep]
    x = digits.images[keep][:, None].astype(np.uint8)  # 0..16 as uint8: read as /255
    np.savez(tmp_path / "held.npz", x=x, y=y)
    model = run_dir / "run" / "model.pt"
    whole = verify(model, data=str(tmp_path / "held.npz"), ood=("noise",), n_boot=10)
    assert whole.report.data.split == "all"
    assert whole.report.data.n_test == len(y)
    ckpt = load_checkpoint(model)
    assert whole.report.threshold == ckpt.threshold  # the deployed one, measured
    part = verify(model, data=str(tmp_path / "held.npz"), ood=("noise",), split="test", n_boot=10)
    assert part.report.data.split == "test" and part.report.data.n_test < len(y)
    own = verify(model, n_boot=10)
    assert own.report.data.split == "test"
    result = runner.invoke(app, ["verify", str(model), "--data", str(tmp_path / "held.npz")])
    assert result.exit_code == 0, result.output
    assert f"all {len(y)} rows" in result.output


# -- 11. low: one line on stderr, hints only for options the command has -------------------


def test_a_plain_pickle_is_named_in_one_stderr_line(tmp_path: Path) -> None:
    import pickle
    import subprocess
    import sys

    path = tmp_path / "weights.pkl"
    with path.open("wb") as f:
        pickle.dump(demo_cnn(num_classes=3, width=4).state_dict(), f)
    proc = subprocess.run(
        [sys.executable, "-m", "moonprune", "inspect", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # no torch warning lines
    assert "written by pickle, not torch.save" in lines[0]
    assert "--trust-checkpoint" not in lines[0]  # inspect has no such option


def test_verify_on_a_pickled_module_does_not_suggest_a_missing_option(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(demo_cnn(num_classes=3, width=4), path)
    line = _one_line_exit_2(runner.invoke(app, ["verify", str(path)]), "pickled Python objects")
    assert "moonprune compress" in line
    result = runner.invoke(app, _compress_args_for(path, tmp_path))
    line = _one_line_exit_2(result, "pickled Python objects")
    assert "--trust-checkpoint" in line  # compress has it


def _compress_args_for(path: Path, tmp_path: Path) -> list[str]:
    return ["compress", str(path), "--arch", ARCH, "--data", "digits:0-2",
            "--out", str(tmp_path / "out"), "--no-export"]  # fmt: skip


def test_usage_errors_are_one_line_as_a_subprocess(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "moonprune", "verify", "m.pt", "--min-auroc", "high"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--min-auroc" in lines[0], proc.stderr
