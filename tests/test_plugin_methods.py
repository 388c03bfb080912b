"""Methods moonprune did not write run end to end through ``moonprune compress``.

``random`` is the entry-point plug-in installed by conftest.py; ``torch-ao`` adapts
PyTorch's WeightNormSparsifier. Both must give a report at the target sparsity with
MOON's K+1 head, like the built-in maskers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moonprune.cli.app import app
from typer.testing import CliRunner

from moonprune.checkpoints import load_checkpoint
from moonprune.models import demo_cnn


@pytest.mark.parametrize("method", ["random", "torch-ao"])
def test_foreign_method_compresses_end_to_end(tmp_path: Path, method: str) -> None:
    torch.manual_seed(0)
    dense = tmp_path / "dense.pt"
    torch.save(demo_cnn(num_classes=6, width=8).state_dict(), dense)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("arch_kwargs = { width = 8 }\n[moon]\nwarmup_epochs = 1\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "compress", str(dense), "--arch", "moonprune.models:demo_cnn", "--config", str(recipe),
        "--data", "digits:0-5", "--ood", "noise", "--out", str(out), "--epochs", "3",
        "--method", method, "--sparsity", "0.8", "--no-export",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method
    assert abs(report["sparsity"] - 0.8) < 0.005
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.has_unknown and ckpt.num_known == 6
    assert set(ckpt.masks) and all(m.dtype == torch.bool for m in ckpt.masks.values())
