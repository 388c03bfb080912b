"""Gates, ROC points and the HTML report, on hand-made assessments."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_samples import run_report, verify_report
from sklearn.metrics import roc_curve as sk_roc_curve

from moonprune.assessment import Assessment
from moonprune.errors import ConfigError
from moonprune.report_parts import CalibrationSummary, TemperatureEffect
from moonprune.reporting import roc_curve, write_html_report
from moonprune.verification import Gates, check_gates


def _assessment(acc: float, auroc: float, fpr: float, ece: float = 0.05) -> Assessment:
    rng = np.random.default_rng(0)
    return Assessment(
        metrics={
            "accuracy": acc,
            "ece": ece,
            "nll": 0.3,
            "ood": {"noise": {"auroc": auroc, "fpr95": fpr, "aupr_in": 0.9, "aupr_out": 0.9}},
        },
        threshold=0.5,
        acceptance={"id_val_accepted": 0.95, "id_test_accepted": 0.94, "ood_rejected": {}},
        ci={"noise": {"auroc": [auroc - 0.02, auroc + 0.02], "fpr95": [fpr - 0.05, fpr + 0.05]}},
        scores={
            "id_test": rng.random(50) + 0.5,
            "id_val": rng.random(50) + 0.5,
            "noise": rng.random(40),
        },
        id_confidence=rng.random(50),
        id_correct=rng.random(50) > 0.2,
    )


def test_gates_pass_and_fail_with_margins() -> None:
    model = _assessment(acc=0.97, auroc=0.91, fpr=0.30)
    dense = _assessment(acc=0.99, auroc=0.93, fpr=0.25)
    checks = check_gates(
        Gates(min_auroc=0.9, max_fpr95=0.2, max_accuracy_drop=0.01, max_auroc_drop=0.05),
        model,
        dense,
    )
    verdicts = {c.gate: c.passed for c in checks}
    assert verdicts == {
        "min_auroc": True,
        "max_fpr95": False,
        "max_accuracy_drop": False,
        "max_auroc_drop": True,
    }
    by_gate = {c.gate: c for c in checks}
    assert by_gate["max_fpr95"].margin == pytest.approx(-0.10)
    assert by_gate["max_accuracy_drop"].value == pytest.approx(0.02)
    assert by_gate["min_auroc"].uncertain  # 0.9 lies inside [0.89, 0.93]


def test_impossible_gate_fails() -> None:
    checks = check_gates(Gates(min_auroc=1.0), _assessment(0.9, 0.99, 0.0))
    assert len(checks) == 1 and not checks[0].passed


def test_drop_gates_need_a_baseline() -> None:
    with pytest.raises(ConfigError, match="--baseline"):
        check_gates(Gates(max_accuracy_drop=0.01), _assessment(0.9, 0.9, 0.1))


def test_gate_values_are_validated() -> None:
    with pytest.raises(ConfigError, match="min-auroc"):
        Gates(min_auroc=float("nan"))


def test_roc_points_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    id_s = np.round(rng.normal(1, 1, 200), 1)  # ties on purpose
    ood_s = np.round(rng.normal(0, 1, 150), 1)
    fpr, tpr = roc_curve(id_s, ood_s)
    labels = np.r_[np.ones(200), np.zeros(150)]
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, np.r_[id_s, ood_s], drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)


def test_html_report_is_self_contained_and_images_decode(tmp_path: Path) -> None:
    models = {"dense": _assessment(0.99, 0.95, 0.2), "compressed": _assessment(0.97, 0.9, 0.3)}
    report = run_report(channel=False)
    sparsity = {"dense": {"a.weight": 0.0, "b.weight": 0.0},
                "compressed": {"a.weight": 0.5, "b.weight": 0.95}}  # fmt: skip
    path = write_html_report(tmp_path / "report.html", report, models, sparsity)
    page = path.read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    # ROC (1 OOD set) + 2 histograms + calibration + sparsity
    assert len(images) == 5
    for b64 in images:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            img.load()
            assert img.width > 100 and img.height > 100
    # the typed record's facts, and report.json as written (with its schema version)
    assert "method <b>rigl</b>, MOON True,\nunknowns patch4," in page
    assert "sparsity 90.00% (target 90%), score msp," in page
    assert "threshold 0.7500 at TPR 0.95" in page and "AUROC % at T = 1 vs noise" in page
    assert "<td>91.00</td>" in page and "<b>warning:</b> accuracy warning" in page
    assert html.escape(json.dumps(report.to_json(), indent=2)) in page
    assert "&quot;schema_version&quot;: 1" in page


def test_html_report_of_verify_has_no_compress_only_parts(tmp_path: Path) -> None:
    models = {"dense": _assessment(0.99, 0.95, 0.2), "compressed": _assessment(0.97, 0.9, 0.3)}
    page = write_html_report(tmp_path / "v.html", verify_report(), models, {}).read_text()
    assert "method <b>rigl</b>, MOON True,\nunknowns none," in page
    assert "threshold 0.7000 at TPR 0.95" in page
    assert "at T = 1" not in page and "warning:" not in page
    assert "&quot;checkpoint_threshold&quot;: 0.75" in page


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1200,1600",
]  # fmt: skip


def test_demo_report_renders_in_a_headless_browser(demo_run, tmp_path: Path) -> None:
    """Chromium (when installed, as on CI's machine) renders report.html to a picture."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine; the PNG-decoding test above still runs")
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", (demo_run.out / "report.html").resolve().as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20  # not a blank page: text and plots were drawn


def test_output_paths_are_checked_before_any_work(tmp_path: Path) -> None:
    from moonprune.verification import check_output_path

    assert check_output_path(tmp_path / "v.json", "--json") == tmp_path / "v.json"
    (tmp_path / "file").write_text("")
    for bad, words in ((tmp_path / "no" / "v.json", "does not exist"),
                       (tmp_path / "file" / "v.json", "is not a folder"),
                       (tmp_path, "is a folder")):  # fmt: skip
        with pytest.raises(ConfigError, match=words) as err:
            check_output_path(bad, "--html")
        assert str(bad) in str(err.value) and "--html" in str(err.value)


def test_console_lines_say_what_the_temperature_fit_did() -> None:
    from moonprune.cli.render import acceptance_lines, temperature_lines

    refused = {"setting": "auto", "fitted": 0.4612, "used": 1.0, "refused": "saturates the softmax"}
    fitted = {"setting": "auto", "fitted": 2.0, "used": 2.0, "refused": None}
    effect = TemperatureEffect(0.1, 0.05, 0.5, 0.4, {"noise": 0.9}, {"noise": 0.9})
    report = dataclasses.replace(
        run_report(),
        threshold=0.9,
        acceptance={"id_val_accepted": 0.954, "ood_rejected": {"noise": 0.5}},
        calibration={
            "dense": CalibrationSummary(1.0, refused),
            "compressed": CalibrationSummary(2.0, fitted, effect),
        },
    )
    assert acceptance_lines(report) == [
        "threshold 0.9000 (msp) accepts 95.4% of ID validation inputs (target 95%)",
        "  rejects 50.0% of noise",
    ]
    lines = temperature_lines(report)
    assert (
        lines[0]
        == "dense temperature: fitted 0.461, refused (saturates the softmax), using T = 1.000"
    )
    assert lines[1] == "compressed temperature: fitted 2.000, using T = 2.000"
    assert lines[2].startswith("compressed at T=2.000: ECE 10.00% -> 5.00%")
