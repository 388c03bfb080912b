"""``moonprune export``, ``inspect`` and ``bench`` through the CLI, error paths too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from moonprune.cli.app import app
from typer.testing import CliRunner

from moonprune.data import load_splits

runner = CliRunner()


@pytest.fixture()
def demo_files(demo_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo's model.pt and model.onnx copied into ``tmp_path``, the working folder
    (short relative names keep rich's tables and lines unwrapped)."""
    for name in ("model.pt", "model.onnx"):
        shutil.copy(demo_run.out / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_error_line(output: str, needle: str) -> None:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], output
    assert "Traceback" not in output


def test_bench_reports_latency_and_throughput(demo_files: Path) -> None:
    result = runner.invoke(app, ["bench", "model.onnx", "--runs", "3", "--warmup", "1",
                                 "--batch", "8", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    for text in ("threads=1", "p50 ms (b=1)", "images/s (b=8)", "model.onnx"):
        assert text in result.output
    assert " vs " not in result.output


def test_bench_vs_compares_two_files(demo_files: Path) -> None:
    shutil.copy("model.onnx", "other.onnx")
    result = runner.invoke(app, ["bench", "model.onnx", "--vs", "other.onnx", "--runs", "3",
                                 "--warmup", "1", "--batch", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "other.onnx" in result.output
    assert "model.onnx vs other.onnx:" in result.output
    assert "x at batch 1" in result.output and "throughput at batch 4" in result.output


def test_bench_of_a_missing_file_exits_2(demo_files: Path) -> None:
    result = runner.invoke(app, ["bench", "missing.onnx", "--runs", "1"])
    assert result.exit_code == 2
    _one_error_line(result.output, "missing.onnx")


def test_inspect_onnx_json(demo_files: Path) -> None:
    result = runner.invoke(app, ["inspect", "model.onnx", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "onnx" and info["opset"] == 18
    assert info["bytes"] == (demo_files / "model.onnx").stat().st_size
    assert 0 < info["gzip_bytes"] < info["bytes"]
    assert len(info["layers"]) == 4
    assert info["parameters"] == sum(row["parameters"] for row in info["layers"])
    assert info["nonzeros"] == sum(row["nonzeros"] for row in info["layers"])
    assert abs(info["prunable_sparsity"] - 0.9) < 0.01
    meta = info["metadata"]
    assert isinstance(meta["moonprune.classes"], list) and len(meta["moonprune.classes"]) == 6
    assert meta["moonprune.score"] == "msp" and "height" in meta["moonprune.preprocessing"]


def test_inspect_checkpoint_json(demo_files: Path) -> None:
    result = runner.invoke(app, ["inspect", "model.pt", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "moonprune-checkpoint"
    onnx_info = json.loads(runner.invoke(app, ["inspect", "model.onnx", "--json"]).output)
    assert info["nonzeros"] == onnx_info["nonzeros"]
    assert info["prunable_parameters"] == onnx_info["prunable_parameters"]


def test_export_with_opset_score_and_tpr(demo_files: Path) -> None:
    result = runner.invoke(app, ["export", "model.pt", "--out", "e.onnx", "--opset", "17",
                                 "--score", "energy", "--tpr", "0.9"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "exported e.onnx" in result.output and "ID val accepted %" in result.output
    opset_rows = [line.split() for line in result.output.splitlines() if " opset " in line]
    assert len(opset_rows) == 1 and "17" in opset_rows[0], result.output
    model = onnx.load("e.onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["moonprune.score"] == "energy" and float(meta["moonprune.tpr"]) == 0.9
    session = ort.InferenceSession("e.onnx", providers=["CPUExecutionProvider"])
    val = load_splits("digits:0-5", seed=0).val.x.numpy()
    accepted = float((~session.run(["is_unknown"], {"input": val})[0]).mean())
    assert abs(accepted - 0.9) <= 0.02
    info = json.loads(runner.invoke(app, ["inspect", "e.onnx", "--json"]).output)
    assert info["opset"] == 17


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--opset", "14"], "from 15 to 25"),
        (["--tpr", "1.5"], "--tpr must be in (0, 1)"),
        (["--score", "nope"], "nope"),
        (["--quantize", "int4"], "int4"),
    ],
)
def test_export_bad_options_exit_2(demo_files: Path, args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["export", "model.pt", "--out", "bad.onnx", *args])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, needle)
    assert not Path("bad.onnx").exists()


def test_inspect_as_subprocess(demo_files: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "moonprune", "inspect", "model.onnx", "--json"],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["format"] == "onnx"
    bad = subprocess.run([sys.executable, "-m", "moonprune", "inspect", "missing.onnx"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2
    _one_error_line(bad.stderr, "missing.onnx")
