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
    assert meta["moonprune.score"] == "mahalanobis++"  # the default (README "OOD scores")
    assert "height" in meta["moonprune.preprocessing"]


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


def _foreign_onnx(path: Path, shape: list[int | str]) -> Path:
    """A non-moonprune file: one Relu on an input called ``pixels`` of ``shape``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["pixels"], ["out"])], "foreign",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_bench_measures_a_fixed_batch_file_at_its_batch(demo_files: Path) -> None:
    _foreign_onnx(Path("fixed.onnx"), [1, 3, 8, 8])
    result = runner.invoke(app, ["bench", "fixed.onnx", "--runs", "2", "--warmup", "0",
                                 "--batch", "16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "takes a fixed batch of 1" in result.output and "Traceback" not in result.output


def test_bench_of_a_file_with_a_symbolic_sample_shape_exits_2(demo_files: Path) -> None:
    _foreign_onnx(Path("open.onnx"), ["N", 3, "H", 8])
    result = runner.invoke(app, ["bench", "open.onnx", "--runs", "1"])
    assert result.exit_code == 2
    _one_error_line(result.output, "every dimension but the first fixed")


@pytest.mark.parametrize(
    "args",
    [["--runs", "0"], ["--batch", "0"], ["--warmup", "-1"], ["--threads", "0"],
     ["--threads", "-2"]],
)  # fmt: skip
def test_bench_bad_counts_exit_2_naming_the_option(demo_files: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["bench", "model.onnx", *args])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, f"{args[0]} {args[1]} is not allowed; use {args[0]}")


def test_bench_of_a_checkpoint_says_it_takes_onnx(demo_files: Path) -> None:
    result = runner.invoke(app, ["bench", "model.pt", "--runs", "1"])
    assert result.exit_code == 2
    _one_error_line(result.output, "bench takes an .onnx file")


def test_upper_case_onnx_suffix_is_onnx(demo_files: Path) -> None:
    shutil.copy("model.onnx", "MODEL.ONNX")
    result = runner.invoke(app, ["inspect", "MODEL.ONNX", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["format"] == "onnx"
    bench = runner.invoke(app, ["bench", "MODEL.ONNX", "--runs", "1", "--warmup", "0"])
    assert bench.exit_code == 0, bench.output


def _edit_metadata(path: str, **props: str) -> None:
    model = onnx.load(path)
    for entry in model.metadata_props:
        if entry.key in props:
            entry.value = props[entry.key]
    onnx.save(model, path)


def test_inspect_names_a_metadata_threshold_the_graph_does_not_use(demo_files: Path) -> None:
    _edit_metadata("model.onnx", **{"moonprune.threshold": "0.123"})
    result = runner.invoke(app, ["inspect", "model.onnx", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["metadata"]["moonprune.threshold"] == "0.123"
    _one_error_line(result.stderr, "differs from the graph's threshold")
    table = runner.invoke(app, ["inspect", "model.onnx"])
    assert table.exit_code == 2 and "total" in table.stdout
    _one_error_line(table.stderr, "re-export the model")


def test_inspect_of_an_untouched_export_reports_no_problem(demo_files: Path) -> None:
    result = runner.invoke(app, ["inspect", "model.onnx", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["problems"] == []


@pytest.mark.parametrize(
    ("props", "needle"),
    [({"moonprune.classes": "[not json"}, "moonprune.classes is not valid JSON"),
     ({"moonprune.threshold": "abc"}, "'abc' is not a number"),
     ({"moonprune.threshold": "nan"}, "not finite")],
)  # fmt: skip
def test_inspect_of_damaged_metadata_exits_2(demo_files: Path, props: dict, needle: str) -> None:
    _edit_metadata("model.onnx", **props)
    result = runner.invoke(app, ["inspect", "model.onnx"])
    assert result.exit_code == 2, result.output
    _one_error_line(result.stderr, needle)


@pytest.mark.parametrize("out", ["model.pt", "./model.pt"])
@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]])
def test_export_refuses_to_write_over_its_input(
    demo_files: Path, out: str, quantize: list[str]
) -> None:
    before = Path("model.pt").read_bytes()
    result = runner.invoke(app, ["export", "model.pt", "--out", out, *quantize])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "moonprune never writes over what it reads")
    assert Path("model.pt").read_bytes() == before
    assert sorted(p.name for p in demo_files.iterdir()) == ["model.onnx", "model.pt"]


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]])
def test_export_into_a_missing_folder_exits_2(demo_files: Path, quantize: list[str]) -> None:
    result = runner.invoke(app, ["export", "model.pt", "--out", "missing/m.onnx", *quantize])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "the folder 'missing' does not exist")
    assert not Path("missing").exists()


def test_export_to_a_folder_exits_2(demo_files: Path) -> None:
    Path("models").mkdir()
    result = runner.invoke(app, ["export", "model.pt", "--out", "models"])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "is a folder")
    assert list(Path("models").iterdir()) == []


@pytest.mark.parametrize("threshold", [float("nan"), 5.0])
def test_export_refuses_a_stored_threshold_outside_the_score(
    demo_files: Path, threshold: float
) -> None:
    import torch

    ckpt = torch.load("model.pt", weights_only=True)
    ckpt["run"]["threshold"] = threshold
    torch.save(ckpt, "tampered.pt")
    result = runner.invoke(app, ["export", "tampered.pt", "--out", "t.onnx"])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "threshold")
    assert not Path("t.onnx").exists()


def test_export_of_an_onnx_file_names_the_checkpoint(demo_files: Path) -> None:
    result = runner.invoke(app, ["export", "model.onnx", "--out", "again.onnx"])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "export takes the moonprune checkpoint")
    assert not Path("again.onnx").exists()


def test_inspect_of_an_empty_onnx_file_exits_2(demo_files: Path) -> None:
    Path("empty.onnx").write_bytes(b"")
    result = runner.invoke(app, ["inspect", "empty.onnx"])
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "holds no ONNX graph")


@pytest.mark.parametrize("measured", [{1: 0.5, 64: 1.2}, {1: 1.3, 64: 1.6}])
def test_int8_export_says_when_it_is_slower_than_float(
    demo_files: Path, monkeypatch: pytest.MonkeyPatch, measured: dict[int, float]
) -> None:
    """int8 is not faster on every CPU: export measures it against the float file and
    says so when it is slower (the measurement is replaced here by fixed figures)."""
    monkeypatch.setattr("moonprune.speed.time_speedups",
                        lambda dense, files, batches, threads: {"int8": measured})  # fmt: skip
    result = runner.invoke(app, ["export", "model.pt", "--out", "q.onnx", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert f"{measured[1]:.2f}x / {measured[64]:.2f}x" in result.output
    slower = "for speed, export without --quantize" in " ".join(result.output.split())
    assert slower == (measured[1] < 1)
