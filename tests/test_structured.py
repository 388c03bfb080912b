"""Channel pruning: targets reached, unknown output kept, shapes rebuilt, ONNX parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moonprune.cli.app import app
from moonprune.exporters import export_onnx
from typer.testing import CliRunner, Result

from moonprune import models
from moonprune.checkpoints import load_checkpoint
from moonprune.conventions import unknown_rows
from moonprune.errors import ConfigError
from moonprune.heads import SeparateUnknownLinear, add_unknown_output_
from moonprune.report_parts import DeployedSpeed
from moonprune.report_records import RunReport
from moonprune.sparsity.channel.pruner import ChannelPruner
from moonprune.sparsity.channel.structure import apply_structure_, module_structure

pytest.importorskip("torch_pruning")
runner = CliRunner()


def _resnet8(width: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """A seeded ResNet-8 (5 classes + unknown) on 3x16x16, its example input and head."""
    torch.manual_seed(0)
    model = models.resnet8(num_classes=5, in_channels=3, width=width).eval()
    x = torch.randn(4, 3, 16, 16)
    return model, x, add_unknown_output_(model, x)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("factory", [models.resnet8, models.mobilenet_tiny])
@pytest.mark.parametrize(("measure", "keep"), [("macs", 0.5), ("params", 0.4)])
def test_prunes_to_target_and_keeps_the_unknown_output(
    factory, measure: str, keep: float, allocation: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = factory(num_classes=5, in_channels=3).eval()
    x = torch.randn(4, 3, 16, 16)
    head = add_unknown_output_(model, x)
    pruner = ChannelPruner(model, x, head, keep=keep, measure=measure, steps=3,
                           allocation=allocation)  # fmt: skip
    fractions = [pruner.step()[f"{measure}_fraction"] for _ in range(3)]
    assert fractions[0] > fractions[1] > fractions[2]  # pruned in steps, not all at once
    stats = pruner.stats()
    assert abs(stats[f"{measure}_fraction"] - keep) < 0.03
    out = model(x)
    assert out.shape == (4, 6)  # K + 1 columns survive
    assert model.get_submodule(head).out_features == 6
    # the unknown row keeps its mark and its weights (on the channels that remain)
    assert unknown_rows(model) == {f"{head}.weight": 5}
    assert bool((model.get_submodule(head).weight[5] != 0).all())

    fresh = factory(num_classes=5, in_channels=3).eval()
    add_unknown_output_(fresh, layer=head)
    apply_structure_(fresh, module_structure(model), model.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), out)

    report = export_onnx(model, tmp_path / "m.onnx", num_known=5, input_shape=(3, 16, 16),
                         threshold=0.5, example_inputs=x)  # fmt: skip
    assert report.labels_agree and report.parity_max_abs_diff < 1e-4


def test_round_to_keeps_channel_counts_multiples_and_the_target() -> None:
    model, x, head = _resnet8(width=16)
    pruner = ChannelPruner(model, x, head, keep=0.5, measure="macs", steps=2, round_to=8)
    for _ in range(2):
        pruner.step()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs), [m.out_channels for m in convs]
    assert pruner.stats()["macs_fraction"] <= 0.5 + 1e-9  # the ratio found reaches it
    assert model(x).shape == (4, 6)


def test_global_allocation_keeps_narrow_layers_whole_and_widths_multiples() -> None:
    model, x, head = _resnet8(width=32)
    pruner = ChannelPruner(model, x, head, keep=0.5, measure="macs", steps=2, round_to=16,
                           allocation="global")  # fmt: skip
    for _ in range(2):
        pruner.step()
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 16 == 0 and w >= 16 for w in widths), widths
    assert pruner.stats()["macs_fraction"] <= 0.5
    assert pruner.ratio is None  # no single per-layer ratio: the layers differ
    assert len(set(widths)) > 1 and max(widths) > 16  # not everything cut to the minimum
    assert model(x).shape == (4, 6)


def test_global_allocation_removes_the_least_important_channels_first() -> None:
    model, x, head = _resnet8(width=16)
    block = model.layers[2]
    dead = torch.arange(0, 64, 4)  # 16 of the last block's 64 inner channels do nothing
    with torch.no_grad():
        block.conv1.weight[dead] = 0
        block.bn1.weight[dead] = 0
        block.bn1.bias[dead] = 0
        block.conv2.weight[:, dead] = 0
    before = {n: m.out_channels for n, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d)}  # fmt: skip
    pruner = ChannelPruner(model, x, head, keep=0.99, measure="macs", steps=1,
                           allocation="global")  # fmt: skip
    pruner.step()
    after = {n: m.out_channels for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d)}  # fmt: skip
    removed = 64 - after["layers.2.conv1"]
    assert 0 < removed <= 16
    assert {n: w for n, w in after.items() if n != "layers.2.conv1"} == {
        n: w for n, w in before.items() if n != "layers.2.conv1"
    }
    dead_left = int((block.conv1.weight.flatten(1).abs().sum(1) == 0).sum())
    assert dead_left == 16 - removed  # every channel removed was a dead one


@pytest.mark.parametrize("factory", [models.resnet8, models.mobilenet_tiny])
def test_global_allocation_does_not_collapse_the_costliest_layers(factory) -> None:
    # Ranking by importance per MAC alone would empty the wide-image early layers (their
    # channels cost the most): the importance lost is relative to what the layer has left,
    # so each removal makes that layer's remaining channels dearer.
    torch.manual_seed(0)
    model = factory(num_classes=5, in_channels=3).eval()
    x = torch.randn(4, 3, 16, 16)
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    head = add_unknown_output_(model, x)
    pruner = ChannelPruner(model, x, head, keep=0.5, measure="macs", steps=2,
                           allocation="global")  # fmt: skip
    for _ in range(2):
        pruner.step()
    kept = {n: m.out_channels / dense[n] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)}  # fmt: skip
    assert min(kept.values()) >= 0.25, kept


class _FlattenNet(torch.nn.Module):
    """No global pooling: each conv channel feeds 8x8 inputs of the first Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc1, self.fc = torch.nn.Linear(16 * 8 * 8, 32), torch.nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.fc1(x.flatten(1))))


class _ChannelsLastMLP(torch.nn.Module):
    """ConvNeXt-style: Linear layers on (N, H, W, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.pw1, self.pw2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw2(torch.relu(self.pw1(self.c1(x).permute(0, 2, 3, 1))))
        return self.fc(x.permute(0, 3, 1, 2).mean((2, 3)))


COST_MODELS = {
    "flatten": _FlattenNet,
    "channels-last": _ChannelsLastMLP,
    "resnet8": lambda: models.resnet8(num_classes=5, in_channels=3),
    "mobilenet": lambda: models.mobilenet_tiny(num_classes=5, in_channels=3),
}


@pytest.mark.parametrize("measure", ["macs", "params"])
@pytest.mark.parametrize("factory", list(COST_MODELS.values()), ids=list(COST_MODELS))
def test_global_allocation_predicts_what_a_chunk_saves(factory, measure: str) -> None:
    """The ranking's cost model agrees with a real count for every candidate chunk."""
    import copy

    import torch_pruning as tp

    from moonprune.sparsity.channel.allocation import GlobalAllocator
    from moonprune.sparsity.channel.structure import count_macs_params

    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, 8, 8)
    head = add_unknown_output_(model, x)
    allocator = GlobalAllocator(model, x, head, tp.importance.MagnitudeImportance(p=2), 1,
                                 measure)  # fmt: skip
    before = count_macs_params(model, x)[measure == "params"]
    names = {m: n for n, m in model.named_modules()}
    candidates = allocator.candidates()
    assert candidates
    for _, group, drop in candidates:
        root = group[0].dep.target.module
        predicted = allocator.saving(group, len(drop), allocator.dg.get_out_channels(root))
        trial = copy.deepcopy(model)
        dg = tp.DependencyGraph().build_dependency(trial, example_inputs=x)
        layer = trial.get_submodule(names[root])
        dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels,
                             drop).prune()  # fmt: skip
        real = before - count_macs_params(trial, x)[measure == "params"]
        # biases and norm layers are left out of the prediction: a few percent at most
        assert 0.85 * real <= predicted <= real, (names[root], predicted, real)


def test_global_allocation_with_taylor_importance() -> None:
    torch.manual_seed(0)
    model = models.mobilenet_tiny(num_classes=5, in_channels=3).eval()
    x = torch.randn(8, 3, 16, 16)
    head = add_unknown_output_(model, x)
    pruner = ChannelPruner(model, x, head, keep=0.6, measure="params", steps=2,
                           importance="taylor", allocation="global", round_to=8)  # fmt: skip
    batch = (x, torch.randint(0, 5, (8,)))
    model.train()  # as between fine-tuning epochs
    for _ in range(2):
        pruner.step(batch)
    assert pruner.stats()["params_fraction"] <= 0.6
    assert all(p.grad is None for p in model.parameters())
    # the importance passes (one per removed chunk) leave BatchNorm's statistics alone
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(int(m.num_batches_tracked) == 0 for m in bns)
    assert model.training
    assert model(x).shape == (8, 6)


def test_unreachable_target_is_an_error_not_a_dense_model() -> None:
    model, x, head = _resnet8(width=16)
    # rounding to 16 channels leaves the 16-wide layers nothing to remove
    with pytest.raises(ConfigError, match="smaller round_to than 16"):
        ChannelPruner(model, x, head, keep=0.5, measure="macs", steps=1, round_to=16,
                      allocation="uniform")  # fmt: skip
    # global allocation gets further (it reshapes the wide layers) but not to 10%; it
    # says so before any training (on a copy), leaving the model as it was
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"at most 16 channels keeps \d+%; use a smaller"):
        ChannelPruner(model, x, head, keep=0.1, measure="macs", steps=4, round_to=16,
                      allocation="global")  # fmt: skip
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())


DENSE_R8 = {n: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
            for n, m in models.resnet8(num_classes=6, in_channels=1).named_modules()
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}  # fmt: skip


def structure_widths(out: Path) -> dict[str, int]:
    """Output widths of every conv/linear layer of ``out/model.pt``."""
    from moonprune.checkpoints import load_checkpoint
    from moonprune.sparsity.channel.structure import layer_widths

    return layer_widths(load_checkpoint(out / "model.pt").model)


def _compress_resnet8(tmp_path: Path, *options: str) -> tuple[Result, Path]:
    """``moonprune compress --method channel --macs-target 0.5`` on a ResNet-8, on digits."""
    torch.manual_seed(0)
    torch.save(models.resnet8(num_classes=6, in_channels=1).state_dict(), tmp_path / "r8.pt")
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "compress", str(tmp_path / "r8.pt"), "--arch", "moonprune.models:resnet8",
        "--data", "digits:0-5", "--ood", "noise", "--method", "channel", "--macs-target", "0.5",
        "--prune-steps", "2", "--out", str(out), *options,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result, out


def test_compress_channel_end_to_end(tmp_path: Path) -> None:
    # a MAC target under the default (latency) allocation: the widths of the fastest
    # measured candidate at 50% MACs (timing modelled, tests/fake_timer.py), on its grid
    result, out = _compress_resnet8(tmp_path, "--epochs", "4")
    report = json.loads((out / "report.json").read_text())
    structure = report["structure"]
    assert structure["allocation"] == "latency" and structure["measure"] == "macs"
    assert 0.4 < structure["macs_fraction"] <= 0.5  # at most the target, one grid step off
    plan = structure["plan"]
    pruned = {n: w for n, w in plan["widths"].items() if w < DENSE_R8[n]}
    assert pruned and all(w % plan["grid"] == 0 for w in pruned.values()), pruned
    assert structure_widths(out) == plan["widths"]  # the trained net has the measured shape
    assert min(plan["speedup_before_training"].values()) > 1 and plan["search_s"] > 0
    speed = structure["speed"]  # model.onnx (with rejector) vs the dense export
    assert set(speed["speedup"]) == {"1", "64"} and min(speed["speedup"].values()) > 1
    assert speed["threads"] >= 1
    record = RunReport.from_json(report)  # structure.speed is the typed deployed speed
    assert record.deployed_speed == DeployedSpeed(speed["speedup"], speed["threads"],
                                                  speed["compared_with"])  # fmt: skip
    assert "speed" not in (record.structure or {}) and record.to_json() == report
    assert "model.onnx vs the dense export" in result.output
    assert report["target_sparsity"] is None  # the target is a MAC fraction, not zeros
    macs = f"{100 * report['structure']['macs_fraction']:.1f}% of the dense MACs"
    assert macs in (out / "report.html").read_text() and macs in result.output
    verified = runner.invoke(app, ["verify", str(out / "model.pt"), "--html",
                                   str(tmp_path / "v.html")])  # fmt: skip
    assert verified.exit_code == 0, verified.output
    assert macs in verified.output and macs in (tmp_path / "v.html").read_text()
    inspected = runner.invoke(app, ["inspect", str(out / "model.pt"), "--json"])
    info = json.loads(inspected.output)
    assert info["structure"]["macs"] <= 0.5 * info["structure"]["dense_macs"]
    assert info["structure"]["changed_layers"]
    assert (out / "model.onnx").is_file()

    # stage 2: RigL on the slimmer network, starting from stage 1's checkpoint
    result = runner.invoke(app, [
        "compress", str(out / "model.pt"), "--data", "digits:0-5", "--ood", "noise",
        "--method", "rigl", "--sparsity", "0.8", "--epochs", "2", "--out",
        str(tmp_path / "stage2"), "--no-export",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    stage2 = json.loads((tmp_path / "stage2" / "report.json").read_text())
    assert abs(stage2["sparsity"] - 0.8) < 0.005
    info2 = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "stage2" / "model.pt"),
                                           "--json"]).output)  # fmt: skip
    assert info2["structure"]["macs"] == info["structure"]["macs"]  # slim shapes kept


def test_compress_channel_global_allocation_from_the_cli(tmp_path: Path) -> None:
    _, out = _compress_resnet8(
        tmp_path, "--allocation", "global", "--round-to", "8", "--epochs", "2", "--no-export"
    )
    structure = json.loads((out / "report.json").read_text())["structure"]
    assert structure["allocation"] == "global" and structure["ratio"] is None
    assert structure["macs_fraction"] <= 0.5
    info = json.loads(runner.invoke(app, ["inspect", str(out / "model.pt"), "--json"]).output)
    after = [c["after"] for c in info["structure"]["changed_layers"].values()]
    widths = [a["out_channels"] for a in after if "out_channels" in a]
    assert widths and all(w % 8 == 0 for w in widths), widths


def test_channel_progress_counts_epochs_over_the_whole_run() -> None:
    from moonprune.config import build_config
    from moonprune.data import load_splits
    from moonprune.sparsity.channel.training import train_channel_pruned

    splits = load_splits("digits:0-5", seed=0)
    torch.manual_seed(0)
    model = models.resnet8(num_classes=6, in_channels=1)
    head = add_unknown_output_(model, splits.train.x[:2])
    sparsity = {"method": "channel", "macs_target": 0.6, "steps": 2}
    cfg = build_config({"checkpoint": "", "data": "digits:0-5", "out": "unused",
                        "train": {"epochs": 5}, "moon": {"warmup_epochs": 1},
                        "sparsity": sparsity})  # fmt: skip

    class Recorder:
        def __init__(self) -> None:
            self.steps: set[int] = set()
            self.ends: list[int] = []

        def on_step(self, info) -> None:
            self.steps.add(info.epoch)

        def on_epoch_end(self, info) -> None:
            self.ends.append(info.epoch)

    recorder = Recorder()
    result, _ = train_channel_pruned(model, splits.train, head, cfg, recorder)
    assert recorder.ends == [0, 1, 2, 3, 4] and recorder.steps == {0, 1, 2, 3, 4}
    assert [h.epoch for h in result.history] == [0, 1, 2, 3, 4]


def test_channel_needs_an_epoch_per_step(tmp_path: Path) -> None:
    from moonprune.config import build_config
    from moonprune.sparsity.channel.settings import check_channel_config

    torch.save(models.resnet8(num_classes=6, in_channels=1).state_dict(), tmp_path / "r8.pt")
    result = runner.invoke(app, [
        "compress", str(tmp_path / "r8.pt"), "--arch", "moonprune.models:resnet8",
        "--data", "digits:0-5", "--method", "channel", "--prune-steps", "3", "--epochs", "2",
        "--out", str(tmp_path / "out"), "--no-export",
    ])  # fmt: skip
    assert result.exit_code == 2 and "at least 3 epochs" in result.output
    assert not (tmp_path / "out").exists()
    # without --prune-steps the steps follow the epochs: 2 epochs, 2 steps
    cfg = build_config({"checkpoint": "d.pt", "data": "digits", "out": "o",
                        "train": {"epochs": 2}, "sparsity": {"method": "channel"}})  # fmt: skip
    check_channel_config(cfg)


def test_methods_lists_channel_with_the_options_it_takes() -> None:
    from moonprune.config import CHANNEL_OPTIONS

    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "moonprune" in next(line for line in lines if line.startswith("│ channel"))
    channel = next(line for line in lines if line.startswith("options of channel "))
    assert "steps between fine-tuning stages" in channel
    assert all(flag in channel for _, flag in CHANNEL_OPTIONS.values()), channel
    rigl = next(line for line in lines if line.startswith("options of") and "rigl" in line)
    assert "--distribution" in rigl and "--speedup" not in rigl
    assert "steps after every optimizer step" in rigl


def test_an_unreachable_speedup_exits_2_before_training(tmp_path: Path) -> None:
    torch.save(models.resnet8(num_classes=6, in_channels=1).state_dict(), tmp_path / "r8.pt")
    result = runner.invoke(app, [
        "compress", str(tmp_path / "r8.pt"), "--arch", "moonprune.models:resnet8",
        "--data", "digits:0-5", "--method", "channel", "--speedup", "20", "--epochs", "2",
        "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "cannot reach a 20.00x speed-up at batch 64" in " ".join(result.output.split())
    assert "ask for at most that with --speedup" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_channel_pruning_with_synthesized_unknowns(tmp_path: Path) -> None:
    """--unknowns works with channel pruning: the unknown row survives the surgery, the
    synthesized rows train it (p(unknown) on them far above the ID rows'), and the report
    says which unknowns were used."""
    result, out = _compress_resnet8(tmp_path, "--epochs", "2", "--unknowns", "blur",
                                    "--unknown-head", "separate")  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    unknowns = report["unknowns"]
    assert unknowns["generators"] == ["blur"] and unknowns["beyond_paper"]
    assert report["structure"]["macs_fraction"] <= 0.5
    synth = unknowns["p_unknown_synth"]["synth: blur"]
    assert synth > 3 * report["models"]["compressed"]["p_unknown"]["id_test"]["mean"]
    assert "beyond the MOON paper" in " ".join(result.output.split())
    # the separate head survives channel pruning, the checkpoint records it (format 3,
    # which older releases refuse) and the export passed parity
    assert unknowns["head"] == "separate" and "separate unknown head" in result.output
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["format_version"] == 3 and saved["unknown_head"] == "separate"
    ckpt = load_checkpoint(out / "model.pt")
    assert isinstance(ckpt.model.get_submodule(ckpt.head_layer), SeparateUnknownLinear)
    assert (out / "model.onnx").exists()
