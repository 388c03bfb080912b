"""The typed reports: report.json's keys (golden lists), the round trip through JSON,
the schema version check, and the console and HTML rendered from the typed records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from report_samples import run_report, verify_report
from rich.console import Console

from moonprune.report_parts import SCHEMA_VERSION, DeployedSpeed, ReportError
from moonprune.report_records import RunReport, VerifyReport

#: compress's report.json, top level, in the order written (the export last, when made)
RUN_KEYS = [
    "schema_version", "moonprune_version", "structure", "method", "moon", "unknowns",
    "target_sparsity", "sparsity", "threshold", "tpr", "score", "acceptance", "models",
    "ci", "temperature", "calibration", "gates", "passed", "timing", "data",
    "preprocessing", "history", "rollbacks", "auroc_t1", "warnings", "scores", "config",
    "export",
]  # fmt: skip
#: DESIGN.md's "report.json contract"
CONTRACT_KEYS = {"moonprune_version", "method", "target_sparsity", "sparsity", "threshold",
                 "tpr", "models", "timing"}  # fmt: skip
RUN_NESTED = {
    "timing": ["dense_eval_s", "train_s", "epoch_s_mean", "export_s", "total_s"],
    "data": ["id", "classes", "n_train", "n_val", "n_test", "ood"],
    "unknowns": ["setting", "generators", "beyond_paper", "fraction", "weight",
                 "val_unknown_rate", "p_unknown_synth", "warnings", "head"],
    "export": ["path", "bytes", "gzip_bytes", "parity_max_abs_diff", "labels_agree", "opset",
               "export_seconds"],
}  # fmt: skip
CALIBRATION_KEYS = ["temperature", "temperature_fit", "ece_before", "ece_after", "nll_before",
                    "nll_after", "auroc_before", "auroc_after", "auroc_changed"]  # fmt: skip
GATE_KEYS = ["gate", "subject", "value", "bound", "passed", "margin", "ci", "uncertain"]
HISTORY_KEYS = ["epoch", "loss", "lr", "a", "density", "unknown_rate"]
ROLLBACK_KEYS = ["epoch", "loss", "reason", "lr_scale_before", "lr_scale_after"]
VERIFY_KEYS = [
    "schema_version", "moonprune_version", "method", "moon", "target_sparsity", "sparsity",
    "structure", "threshold", "checkpoint_threshold", "temperature", "calibration", "tpr",
    "score", "acceptance", "models", "ci", "scores", "data", "gates", "passed", "timing",
]  # fmt: skip
VERIFY_NESTED = {
    "data": ["id", "ood", "seed", "split", "n_test", "features_fitted_on"],
    "timing": ["compressed_eval_s", "total_eval_s"],
}


def _through_disk(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


def _check_run_keys(report: dict) -> None:
    assert list(report) == RUN_KEYS and set(report) >= CONTRACT_KEYS
    assert report["schema_version"] == SCHEMA_VERSION == 1
    for key, expected in RUN_NESTED.items():
        assert list(report[key]) == expected, key
    for cal in report["calibration"].values():
        assert list(cal) == CALIBRATION_KEYS
    assert all(list(g) == GATE_KEYS for g in report["gates"])
    assert all(list(h) == HISTORY_KEYS for h in report["history"])
    assert all(list(r) == ROLLBACK_KEYS for r in report["rollbacks"])


def test_run_report_keys_are_the_golden_list() -> None:
    written = run_report().to_json()
    _check_run_keys(written)
    assert written["structure"]["speed"] == {"speedup": {"1": 1.75, "64": 2.0}, "threads": 2,
                                             "compared_with": "the dense model"}  # fmt: skip
    assert written["passed"] is False  # one gate failed
    assert written["calibration"]["compressed"]["auroc_changed"] is True
    assert written["calibration"]["dense"]["auroc_changed"] is False
    assert written["gates"][0]["ci"] == [0.88, 0.96] and written["gates"][0]["uncertain"]
    # no export, no speed: the keys a run without --export writes
    bare = dataclasses.replace(run_report(channel=False), export=None).to_json()
    assert list(bare) == RUN_KEYS[:-1] and bare["structure"] is None


def test_verify_report_keys_are_the_golden_list() -> None:
    written = verify_report().to_json()
    assert list(written) == VERIFY_KEYS and written["schema_version"] == SCHEMA_VERSION
    for key, expected in VERIFY_NESTED.items():
        assert list(written[key]) == expected, key
    assert written["calibration"]["dense"] == {"temperature": 1.0, "temperature_fit": None}
    assert written["passed"] is False


@pytest.mark.parametrize("make", [run_report, lambda: run_report(channel=False)])
def test_run_report_round_trip(make) -> None:
    record = make()
    assert RunReport.from_json(record.to_json()) == record
    assert RunReport.from_json(_through_disk(record.to_json())) == record
    assert _through_disk(RunReport.from_json(record.to_json()).to_json()) == _through_disk(
        record.to_json()
    )


def test_verify_report_round_trip() -> None:
    record = verify_report()
    assert VerifyReport.from_json(record.to_json()) == record
    assert VerifyReport.from_json(_through_disk(record.to_json())) == record
    changed = dataclasses.replace(record, threshold=0.5)
    assert VerifyReport.from_json(changed.to_json()) != record  # the comparison can fail


def test_demo_run_report_json_is_the_typed_record(demo_run) -> None:
    """What compress wrote to disk is the record it returned, and reads back equal."""
    on_disk = json.loads((demo_run.out / "report.json").read_text())
    _check_run_keys(on_disk)
    assert on_disk == _through_disk(demo_run.report.to_json())
    assert RunReport.from_json(on_disk) == demo_run.report
    report = demo_run.report
    assert report.export is not None and report.export.opset == on_disk["export"]["opset"]
    assert report.timing.export_s is not None and report.timing.total_s is not None
    assert report.timing.total_s > report.timing.export_s > 0
    assert [h.epoch for h in report.history] == list(range(8))


def test_verify_json_reads_back(demo_run, tmp_path: Path) -> None:
    from moonprune.verification import Gates, save_outputs, verify

    result = verify(demo_run.out / "model.pt", gates=Gates(max_ece=0.0), n_boot=5)
    assert not result.report.passed and [g.gate for g in result.report.gates] == ["max_ece"]
    (path,) = save_outputs(result, json_path=tmp_path / "v.json")
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == VERIFY_KEYS and on_disk["passed"] is False
    assert VerifyReport.from_json(on_disk) == result.report
    assert result.report.threshold == demo_run.report.threshold  # same split, same settings


@pytest.mark.parametrize(
    ("version", "words"),
    [(2, "has schema_version 2"), ("1", "has schema_version '1'"), (None, "has no schema_version")],
)
def test_an_unknown_schema_version_is_refused(version, words) -> None:
    for cls, record in ((RunReport, run_report()), (VerifyReport, verify_report())):
        data = record.to_json()
        if version is None:
            del data["schema_version"]
        else:
            data["schema_version"] = version
        with pytest.raises(ReportError) as err:
            cls.from_json(data)
        message = str(err.value)
        assert words in message and "0.0.test" in message  # who wrote it
        assert f"reads schema_version {SCHEMA_VERSION}" in message


def test_a_malformed_report_is_refused_naming_the_field() -> None:
    data = run_report().to_json()
    del data["timing"]
    with pytest.raises(ReportError, match="no field 'timing'"):
        RunReport.from_json(data)
    data = run_report().to_json()
    data["data"]["extra"] = 1
    with pytest.raises(ReportError, match="malformed"):
        RunReport.from_json(data)
    with pytest.raises(ReportError, match="not a JSON object"):
        RunReport.from_json([1, 2])  # type: ignore[arg-type]


def test_a_deployed_speed_needs_a_structure() -> None:
    with pytest.raises(ValueError, match="channel-pruned"):
        dataclasses.replace(run_report(channel=False), deployed_speed=DeployedSpeed({}, 1, ""))


def _text(renderable: object) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_cli_tables_and_lines_render_the_typed_run_report() -> None:
    from moonprune.cli.render import comparison_table, scores_table, summary_lines

    report = run_report()
    table = comparison_table(report)
    assert table.title == "channel + MOON: 48.9% of the dense MACs, 51.2% of its parameters"
    table = _text(table)
    assert "AUROC % vs noise" in table and "-3.00" in table  # 93.00 -> 90.00
    scores = _text(scores_table(report))
    assert "msp *" in scores and "energy *" not in scores
    lines = summary_lines(report, {"model.pt": Path("run/model.pt")})
    expected = [
        "normalize auto: using none \\[x]",  # rich markup escaped
        "threshold 0.7500 (msp) accepts 95.4% of ID validation inputs (target 95%)",
        "  rejects 87.5% of noise",
        "compressed at T=2.000: ECE 10.00% -> 5.00%, NLL 0.5000 -> 0.4000",
        "  T changes the score's ranking: AUROC noise 88.00 -> 90.00",
        "model.onnx vs the dense export (onnxruntime, 2 threads): 1.75x at batch 1, "
        "2.00x at batch 64",
        "AUROC at T = 1 (the paper's protocol), dense -> compressed: noise 91.00 -> 88.50",
        "[yellow]epoch 2 diverged (non-finite loss): rolled back, lr x0.5[/]",
        "[yellow]warning:[/] accuracy warning",
        "unknowns: patch4 (patch4, 25% of each batch, weight 0.5); 2.0% of ID validation "
        "rows -> unknown - beyond the MOON paper; --unknowns none is MOON as published",
        "wrote run/model.pt",
    ]
    for line in expected:
        assert line in lines, line
    plain = run_report(channel=False)
    assert comparison_table(plain).title == "rigl + MOON at 90.0% sparsity (target 90%)"
    assert not any("dense export" in line for line in summary_lines(plain, {}))


def test_cli_verify_table_renders_the_typed_verify_report() -> None:
    from moonprune.cli.render import acceptance_lines, temperature_lines
    from moonprune.cli.verify_cmd import metrics_table

    report = verify_report()
    table = _text(metrics_table(report))
    assert "score msp, threshold 0.7000" in table
    assert "0.9000 [0.880, 0.920]" in table and "0.9300 [0.880, 0.920]" in table
    assert acceptance_lines(report)[0].startswith("threshold 0.7000 (msp) accepts 95.0%")
    assert temperature_lines(report) == []  # given temperatures, no effect measured
