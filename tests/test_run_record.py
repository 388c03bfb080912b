"""Issue 21: the checkpoint keeps a versioned, typed run record, checked again on load;
``verify``, ``export`` and ``inspect`` read a run's settings and data through one
function (:func:`moonprune.reopen.reopen_run`)."""

from __future__ import annotations

import doctest
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from moonprune.cli.app import app
from typer.testing import CliRunner

import moonprune.run_record
from moonprune.assessment import assess
from moonprune.checkpoints import checkpoint_from_dict, load_checkpoint
from moonprune.config import build_config
from moonprune.data import load_splits
from moonprune.errors import CheckpointError, ConfigError
from moonprune.models import demo_cnn
from moonprune.pipeline import compress
from moonprune.preprocessing import Preprocessing
from moonprune.reliability.options import EvalOptions
from moonprune.reopen import RunOverrides, reopen_run
from moonprune.run_record import RECORD_VERSION, RunRecord
from moonprune.verification import verify

DATA, SEED = "digits:0-2", 5
PRE = Preprocessing(1, 8, 8, 1 / 16, (0.3,), (0.4,), "dataset")


def _config(**extra: Any) -> dict[str, Any]:
    return {"checkpoint": "dense.pt", "data": DATA, "ood": ["noise", "textures"], "out": "o",
            "image_size": [8, 8], "train": {"seed": SEED}, "temperature": 1.5,
            "sparsity": {"method": "set", "sparsity": 0.8}, **extra}  # fmt: skip


def _record(**extra: Any) -> RunRecord:
    cfg = build_config(_config(**extra))
    return RunRecord(PRE, cfg.score, cfg.tpr, threshold=-3.5, temperature=1.5, config=cfg)


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.pt`` of a 1-epoch compress with seed 5 (not the default 0)."""
    root = tmp_path_factory.mktemp("seeded")
    torch.manual_seed(0)
    torch.save(demo_cnn(num_classes=3, width=4).state_dict(), root / "dense.pt")
    compress(build_config({
        "checkpoint": str(root / "dense.pt"), "arch": "moonprune.models:demo_cnn",
        "arch_kwargs": {"width": 4}, "data": DATA, "ood": ["noise"], "out": str(root / "run"),
        "export": False, "train": {"epochs": 1, "seed": SEED}, "moon": {"warmup_epochs": 0},
    }))  # fmt: skip
    return root / "run" / "model.pt"


def _old_format(new: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict laid out as before the run record (format version 1)."""
    old = {k: v for k, v in new.items() if k != "run"}
    run = new["run"]
    old.update(format_version=1, config=run["config"], preprocessing=run["preprocessing"],
               threshold=run["threshold"], temperature=run["temperature"], tpr=run["tpr"],
               score=run["score"])  # fmt: skip
    return old


# -- the record itself ------------------------------------------------------------------


@pytest.mark.parametrize("with_config", [True, False])
def test_record_round_trips_through_a_safe_load(tmp_path: Path, with_config: bool) -> None:
    record = _record() if with_config else RunRecord(PRE, "msp", 0.9, 0.25, 2.0)
    torch.save(record.to_dict(), tmp_path / "r.pt")
    back = RunRecord.from_dict(torch.load(tmp_path / "r.pt", weights_only=True), "r.pt")
    assert back == record
    assert back.to_dict() == record.to_dict()


def test_record_types_what_consumers_read() -> None:
    record = _record()
    assert (record.data, record.ood, record.seed) == (DATA, ("noise", "textures"), SEED)
    assert (record.method, record.target_sparsity) == ("set", 0.8)
    assert (record.temperature_setting, record.temperature) == (1.5, 1.5)
    assert record.read_options(workers=0).size == (8, 8)
    bare = RunRecord(PRE)
    assert (bare.data, bare.ood, bare.seed, bare.method) == (None, (), 0, None)
    assert bare.temperature_setting == "auto"
    channel = _record(sparsity={"method": "channel", "sparsity": 0.5})
    assert channel.method == "channel" and channel.target_sparsity is None


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("record_version", RECORD_VERSION + 1, "run record version 2; this moonprune reads up to 1"),
     ("record_version", "1", "record_version '1' is not a version number"),
     ("threshold", math.nan, "threshold nan is not a finite value"),
     ("threshold", "0.5", "threshold '0.5' is not a finite value"),
     ("threshold", 0.5, "threshold 0.5 is not a finite value of the 'mahalanobis++' score"),
     ("tpr", 1.5, "tpr 1.5 must lie in (0, 1)"),
     ("tpr", True, "tpr True must lie in (0, 1)"),
     ("temperature", 0.0, "temperature 0.0 must be a finite number > 0"),
     ("score", 7, "unknown OOD score 7"),
     ("preprocessing", {"channels": 1}, "preprocessing record is damaged"),
     ("config", ["data"], "config must be a mapping of plain values"),
     ("config", {"data": DATA}, "config is damaged (bad value in the recipe: "),
     ("config", {**_config(), "train": {"seed": -1}}, "seed must be an integer in [0, 2**32)"),
     ("config", {**_config(), "tpr": 0.9}, "tpr 0.95 differs from its config's 0.9"),
     ("extra", 1, "unknown field(s) ['extra']")],
)  # fmt: skip
def test_damaged_record_fields_are_named(field: str, value: Any, needle: str) -> None:
    saved = {**_record().to_dict(), field: value}
    with pytest.raises(CheckpointError) as info:
        RunRecord.from_dict(saved, "m.pt")
    message = str(info.value)
    assert message.startswith("m.pt") and needle in message, message
    assert "\n" not in message and "moonprune compress" in message  # the fix


def test_a_missing_record_field_is_named() -> None:
    saved = _record().to_dict()
    del saved["tpr"]
    with pytest.raises(CheckpointError, match="the run record has no 'tpr'"):
        RunRecord.from_dict(saved, "m.pt")


def test_the_record_checks_itself_when_built() -> None:
    with pytest.raises(CheckpointError, match=r"tpr 1\.5"):
        RunRecord(PRE, tpr=1.5)
    with pytest.raises(CheckpointError, match="score 'msp' differs"):
        RunRecord(PRE, "msp", config=build_config(_config()))


def test_module_examples_run() -> None:
    assert doctest.testmod(moonprune.run_record, optionflags=doctest.ELLIPSIS).failed == 0


# -- the checkpoint keeps it, and reads the old layout ---------------------------------


def test_old_format_checkpoint_gives_the_same_settings(seeded_run: Path, tmp_path: Path) -> None:
    new = torch.load(seeded_run, weights_only=True)
    assert new["format_version"] == 2 and new["run"]["record_version"] == RECORD_VERSION
    assert not {"threshold", "temperature", "tpr", "score", "config"} & set(new)
    old_path = tmp_path / "old.pt"
    torch.save(_old_format(new), old_path)
    ckpt, old = load_checkpoint(seeded_run), load_checkpoint(old_path)
    assert old.run == ckpt.run and old.run.seed == SEED and old.run.data == DATA
    assert reopen_run(old, load_data=False) == reopen_run(ckpt, load_data=False)
    assert old.threshold == ckpt.threshold and old.preprocessing == ckpt.preprocessing
    # a file written before calibration existed has no temperature: T = 1
    bare = {k: v for k, v in _old_format(new).items() if k != "temperature"}
    assert checkpoint_from_dict(bare, "older.pt").temperature == 1.0
    # a hand-built one recorded an empty config: no data, seed 0
    assert checkpoint_from_dict({**bare, "config": {}}, "hand.pt").run.config is None
    with pytest.raises(CheckpointError, match=r"older\.pt: tpr 1\.5"):
        checkpoint_from_dict({**bare, "tpr": 1.5}, "older.pt")


def test_checkpoint_refuses_a_missing_or_doubled_record(seeded_run: Path) -> None:
    new = torch.load(seeded_run, weights_only=True)
    with pytest.raises(CheckpointError, match=r"incomplete moonprune checkpoint \(no 'run'\)"):
        checkpoint_from_dict({k: v for k, v in new.items() if k != "run"}, "m.pt")
    with pytest.raises(CheckpointError, match="'threshold' is a field of the run record"):
        checkpoint_from_dict({**new, "threshold": 0.5}, "m.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint \(no 'preprocessing'\)"):
        checkpoint_from_dict({**new, "format_version": 1}, "m.pt")  # a format 1 file


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("tpr", 1.5, "tpr 1.5 must lie in (0, 1)"),
     ("record_version", 9, "run record version 9")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["inspect", "verify", "export"])
def test_cli_refuses_a_damaged_record_in_one_line(
    seeded_run: Path, tmp_path: Path, field: str, value: Any, needle: str, command: str
) -> None:
    saved = torch.load(seeded_run, weights_only=True)
    saved["run"][field] = value
    path = tmp_path / "model.pt"
    torch.save(saved, path)
    extra = ["--out", str(tmp_path / "m.onnx")] if command == "export" else []
    result = CliRunner().invoke(app, [command, str(path), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "m.onnx").exists()


# -- verify, export and inspect read the record ----------------------------------------


def test_reopen_takes_the_record_unless_overridden(seeded_run: Path) -> None:
    ckpt = load_checkpoint(seeded_run)
    settings = reopen_run(ckpt, load_data=False).settings
    assert (settings.data, settings.ood, settings.seed) == (DATA, ("noise",), SEED)
    assert (settings.score, settings.tpr, settings.split) == (ckpt.score, ckpt.tpr, "test")
    assert settings.temperature == ckpt.temperature and settings.baseline_temperature == "auto"
    given = RunOverrides(seed=1, tpr=0.9, temperature=2.0, data="digits:3-5")
    other = reopen_run(ckpt, given, load_data=False).settings
    assert (other.seed, other.tpr, other.temperature, other.split) == (1, 0.9, 2.0, "all")
    with pytest.raises(ConfigError, match="--tpr must be in"):
        reopen_run(ckpt, RunOverrides(tpr=1.5), load_data=False)


def test_reopened_data_is_the_recorded_seeds_split(seeded_run: Path) -> None:
    ckpt = load_checkpoint(seeded_run)
    run = reopen_run(ckpt)
    assert run.data is not None and list(run.data.ood) == ["noise"]
    expected = load_splits(DATA, seed=SEED, preprocessing=ckpt.preprocessing)
    default = load_splits(DATA, seed=0, preprocessing=ckpt.preprocessing)
    assert torch.equal(run.data.splits.test.x, expected.test.x)
    assert not torch.equal(run.data.splits.test.x, default.test.x)  # the seed matters


def test_verify_reads_seed_and_data_from_the_record(seeded_run: Path, tmp_path: Path) -> None:
    report = verify(seeded_run, n_boot=1).report.to_json()
    assert report["data"]["id"] == DATA and report["data"]["ood"] == ["noise"]
    assert report["data"]["seed"] == SEED and report["data"]["split"] == "test"
    # the record is what verify reads: the same file with another recorded seed
    saved = torch.load(seeded_run, weights_only=True)
    saved["run"]["config"]["train"]["seed"] = 7
    torch.save(saved, tmp_path / "reseeded.pt")
    assert verify(tmp_path / "reseeded.pt", n_boot=1).report.data.seed == 7
    # and the old layout verifies exactly like the new one
    torch.save(_old_format(torch.load(seeded_run, weights_only=True)), tmp_path / "old.pt")
    old = verify(tmp_path / "old.pt", n_boot=1).report.to_json()
    assert old["data"] == report["data"] and old["threshold"] == report["threshold"]


def test_export_recalibrates_on_the_recorded_seeds_split(seeded_run: Path, tmp_path: Path) -> None:
    from moonprune.exporters.checkpoint_export import export_checkpoint

    ckpt = load_checkpoint(seeded_run)
    report = export_checkpoint(seeded_run, tmp_path / "m.onnx", tpr=0.8).to_json()

    def threshold_on(seed: int) -> float:
        splits = load_splits(DATA, seed=seed, preprocessing=ckpt.preprocessing)
        fitted = assess(ckpt.model, splits, {}, EvalOptions(ckpt.score, 0.8, n_boot=1),
                        temperature=ckpt.temperature, feature_stats=ckpt.feature_stats)  # fmt: skip
        assert fitted.threshold is not None
        return fitted.threshold

    assert report["threshold"] == pytest.approx(threshold_on(SEED), abs=1e-6)
    assert report["threshold"] != pytest.approx(threshold_on(0), abs=1e-6)


def test_export_without_recorded_data_says_so(seeded_run: Path, tmp_path: Path) -> None:
    from moonprune.exporters.checkpoint_export import export_checkpoint

    saved = torch.load(seeded_run, weights_only=True)
    bare = {**_old_format(saved), "config": {}}  # a hand-built checkpoint records no run
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match="records no data spec to calibrate"):
        export_checkpoint(tmp_path / "bare.pt", tmp_path / "m.onnx")


def test_inspect_shows_the_record(seeded_run: Path) -> None:
    from moonprune.exporters.inspection import inspect_checkpoint

    meta = inspect_checkpoint(seeded_run)["metadata"]
    ckpt = load_checkpoint(seeded_run)
    assert (meta["data"], meta["ood"], meta["seed"]) == (DATA, ["noise"], SEED)
    assert (meta["method"], meta["score"], meta["tpr"]) == ("rigl", ckpt.score, ckpt.tpr)
    assert meta["temperature"] == ckpt.temperature and meta["temperature_setting"] == "auto"
