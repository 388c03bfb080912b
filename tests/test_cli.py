"""The CLI: the demo end to end, compress from a state_dict, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from moonprune.cli.app import app
from typer.testing import CliRunner, Result

from moonprune.models import demo_cnn

runner = CliRunner()
ARCH = "moonprune.models:demo_cnn"


def _args(dense: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compress", str(dense), "--arch", ARCH, "--data", "digits:0-5",
        "--ood", "digits:6-9", "--out", str(out), "--epochs", "2", "--no-export", *extra,
    ]  # fmt: skip


def _recipe(tmp_path: Path, kwargs: str = "num_classes = 6, width = 8") -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(f"arch_kwargs = {{ {kwargs} }}\n[moon]\nwarmup_epochs = 1\n")
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moonprune", *args], capture_output=True, text=True, timeout=300
    )


def _assert_refused(result: Result, out: Path, needle: str) -> str:
    """Exit 2, one line naming the problem, no traceback, nothing in --out; the line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not (out.parent / f".{out.name}.partial").exists()
    return lines[0]


def test_help_teaches() -> None:
    result = runner.invoke(app, ["compress", "--help"])
    assert result.exit_code == 0
    for flag in ("--arch", "--data", "--ood", "--method", "--sparsity", "--no-moon", "--resume"):
        assert flag in result.output


def test_compress_state_dict_end_to_end(dense_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = _recipe(tmp_path)
    result = runner.invoke(app, [*_args(dense_path, out, "--config", str(recipe))])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"dense", "compressed"}
    assert set(report["models"]["compressed"]["ood"]) == {"digits:6-9"}
    assert abs(report["sparsity"] - 0.9) < 0.005
    assert (out / "model.pt").is_file() and (out / "recipe.json").is_file()
    assert not (tmp_path / ".run.partial").exists()
    recipe_saved = json.loads((out / "recipe.json").read_text())
    assert recipe_saved["moon"]["warmup_epochs"] == 1
    # the resolved recipe records what was used, including defaults taken from the data
    assert recipe_saved["arch_kwargs"] == {"num_classes": 6, "width": 8, "in_channels": 1}


BAD_INPUTS = {
    "missing checkpoint": (["--sparsity", "0.9"], "does not exist", "missing.pt"),
    "sparsity 1.5": (["--sparsity", "1.5"], "sparsity", None),
    "epochs 0": (["--epochs", "0"], "epochs", None),
    "class mismatch": (["--data", "digits:0-3"], "4 classes", None),
    "unknown method": (["--method", "rigel"], "rigl", None),
    "unknown data": (["--data", "nosuchdata"], "nosuchdata", None),
    "bad arch": (["--arch", "nosuchpkg.models:net"], "nosuchpkg", None),
    "batch too small for BatchNorm": (["--batch-size", "1"], "BatchNorm cannot train", None),
    "unknown allocation": (["--method", "channel", "--allocation", "greedy"], "allocation", None),
    "channel option, rigl": (
        ["--round-to", "8"],
        "--round-to (sparsity.round_to) applies to --method channel only, not to --method rigl",
        None,
    ),
    "rigl option, channel": (
        ["--method", "channel", "--distribution", "uniform"],
        "--distribution (sparsity.distribution) applies to an unstructured",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case: str, dense_path: Path, tmp_path: Path) -> None:
    extra, needle, checkpoint = BAD_INPUTS[case]
    out = tmp_path / "out"
    ckpt = tmp_path / checkpoint if checkpoint else dense_path
    recipe = _recipe(tmp_path)
    result = runner.invoke(app, [*_args(ckpt, out, "--config", str(recipe)), *extra])
    _assert_refused(result, out, needle)


def test_bad_input_as_subprocess(dense_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(_args(dense_path, out, "--sparsity", "1.5"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1
    assert "sparsity must be in (0, 1)" in proc.stderr
    assert not out.exists()


def test_existing_nonempty_out_is_refused(dense_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, _args(dense_path, out))
    assert result.exit_code == 2
    assert "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_pickled_module_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(demo_cnn(num_classes=6, width=8), path)
    result = runner.invoke(app, _args(path, tmp_path / "out"))
    _assert_refused(result, tmp_path / "out", "--trust-checkpoint")


def test_trusted_pickled_module_must_fit_arch(tmp_path: Path) -> None:
    """Otherwise model.pt, rebuilt from --arch, could not be loaded back."""
    path = tmp_path / "whole.pt"
    torch.save(demo_cnn(num_classes=6, width=8), path)
    result = runner.invoke(
        app,
        [*_args(path, tmp_path / "out"), "--trust-checkpoint", "--arch-kwargs", '{"width": 16}'],
    )
    _assert_refused(result, tmp_path / "out", "'features.0.0.weight' has shape")


def test_non_finite_checkpoint(tmp_path: Path) -> None:
    state = demo_cnn(num_classes=6, width=8).state_dict()
    state["classifier.bias"][0] = float("inf")
    path = tmp_path / "inf.pt"
    torch.save(state, path)
    result = runner.invoke(
        app, [*_args(path, tmp_path / "out"), "--config", str(_recipe(tmp_path))]
    )
    _assert_refused(result, tmp_path / "out", "NaN or infinite")


def test_empty_data_folder(dense_path: Path, tmp_path: Path) -> None:
    (tmp_path / "data" / "a").mkdir(parents=True)
    result = runner.invoke(
        app, [*_args(dense_path, tmp_path / "out"), "--data", str(tmp_path / "data")]
    )
    _assert_refused(result, tmp_path / "out", "no images")


def test_unreadable_data_folder(
    dense_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    real = Path.iterdir

    def denied(self: Path) -> Iterator[Path]:
        if self == data:  # as after chmod 000, which does not stop root
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    result = runner.invoke(app, [*_args(dense_path, tmp_path / "out"), "--data", str(data)])
    line = _assert_refused(result, tmp_path / "out", f"cannot read '{data}'")
    assert "check its permissions" in line


def test_ood_npz_of_wrong_shape(dense_path: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "ood.npz", x=np.zeros((4, 1, 9, 9), dtype=np.float32))
    result = runner.invoke(
        app,
        [*_args(dense_path, tmp_path / "out"), "--config", str(_recipe(tmp_path)),
         "--ood", str(tmp_path / "ood.npz")],
    )  # fmt: skip
    _assert_refused(result, tmp_path / "out", "shape")


def test_error_text_is_printed_literally(dense_path: Path, tmp_path: Path) -> None:
    """A path is not Rich markup: ``[/]`` in it must neither crash nor vanish."""
    missing = tmp_path / "x[/]y.pt"
    result = runner.invoke(app, _args(missing, tmp_path / "out"))
    _assert_refused(result, tmp_path / "out", f"'{missing}' does not exist")


def test_class_count_taken_from_the_data_names_the_subset(dense_path: Path, tmp_path: Path) -> None:
    """num_classes defaults to the data's (4 here); the 6-class checkpoint is the clue."""
    result = runner.invoke(
        app, [*_args(dense_path, tmp_path / "out"), "--data", "digits:0-3",
              "--arch-kwargs", '{"width": 8}'],
    )  # fmt: skip
    line = _assert_refused(result, tmp_path / "out", "the checkpoint has 6 classes")
    assert "'digits:0-3' has 4" in line and "digits:0-5" in line
    assert "shape" not in line


def test_compress_applies_gates_to_its_own_result(dense_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "gated"
    result = runner.invoke(
        app, [*_args(dense_path, out, "--config", str(_recipe(tmp_path))), "--max-ece", "0"]
    )
    assert result.exit_code == 1, result.output
    assert "gates failed" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert [g["gate"] for g in report["gates"]] == ["max_ece"]


def test_methods_lists_builtins_and_plugins_with_origin() -> None:
    proc = _run(["methods"])
    assert proc.returncode == 0, proc.stderr
    for name in ("rigl", "set", "gmp", "magnitude", "random"):
        assert name in proc.stdout
    assert "moonprune-random-masker" in proc.stdout
