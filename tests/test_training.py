"""The training loop: averaging keeps the zeros, resume is exact, schedules line up."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from moonprune.config import MoonConfig, TrainConfig
from moonprune.data import ImageSet
from moonprune.distributed import DistContext
from moonprune.errors import ConfigError
from moonprune.heads import add_unknown_output_
from moonprune.models import demo_cnn
from moonprune.objectives import unknown_aware_loss
from moonprune.sparsity import MASKERS, MaskerConfig
from moonprune.training import (
    StopTraining,
    Trainer,
    batch_starts,
    lr_factor,
    min_rows_per_batch,
)
from moonprune.unknowns import rows_for

TRAIN = TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=3)
MOON = MoonConfig(warmup_epochs=1, average_epochs=1, average_fraction=0.3)


def _model(digits06) -> torch.nn.Module:
    torch.manual_seed(0)
    model = demo_cnn(num_classes=6, width=4)
    add_unknown_output_(model, digits06.train.x[:2])
    return model


def _trainer(model, digits06, method="rigl", state_path=None, moon=MOON) -> Trainer:
    masker = MASKERS.create(method, MaskerConfig(sparsity=0.8, update_interval=3, seed=1))
    return Trainer(model, masker, digits06.train, TRAIN, moon, state_path=state_path)


def test_lr_schedule_shape() -> None:
    cfg = TrainConfig()
    assert lr_factor(0, cfg, 10) == pytest.approx(1.2)
    assert lr_factor(5, cfg, 10) == pytest.approx((1.2 + 0.08) / 2)
    assert lr_factor(10, cfg, 10) == pytest.approx(0.08)
    assert lr_factor(13.5, cfg, 10) == pytest.approx(0.08)


def test_averaging_keeps_zeros_and_topology_freezes_first(digits06) -> None:
    model = _model(digits06)
    trainer = _trainer(model, digits06)
    # mask updates must stop before the averaging epoch starts
    schedule = trainer.masker._schedule  # the masker keeps its schedule after prepare
    assert schedule is not None
    assert schedule.end_step <= trainer.main_epochs * trainer.steps_per_epoch
    result = trainer.run()
    assert result.model is not model  # the averaged copy is the output
    assert trainer.averaging is not None and trainer.averaging.averaged is not None
    n = int(trainer.averaging.averaged.n_averaged)
    assert n == trainer.averaging.updates_per_epoch(trainer.steps_per_epoch) > 1
    averaged = dict(result.model.named_parameters())
    for name, mask in result.masks.items():
        weight = averaged[name]
        assert torch.all(weight[~mask.to(weight.device)] == 0), name
    # the average differs from the last iterate (it really averaged)
    last = dict(model.named_parameters())
    assert any(not torch.equal(averaged[k], last[k]) for k in result.masks)
    # the history records the a each epoch trained with: none in warm-up, then a ramp
    # by a_step whose last epoch trains with a_final, as in the reference
    a = [h.a for h in result.history]
    schedule_a = trainer.schedule
    assert schedule_a is not None and a[0] is None
    assert a[2] - a[1] == pytest.approx(schedule_a.a_step)
    assert a[-1] == pytest.approx(schedule_a.config.a_final)


# stop after epoch 1 (before averaging) or epoch 3 (the first averaging epoch, so the
# running average, its count and the recalibrated BatchNorm must survive the resume)
@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_gives_identical_final_weights(digits06, tmp_path: Path, stop_after: int) -> None:
    moon = MoonConfig(warmup_epochs=1, average_epochs=2, average_fraction=0.3)
    train = TrainConfig(epochs=5, batch_size=64, lr=0.05, seed=3)

    def trainer(model: torch.nn.Module, state_path: Path | None = None) -> Trainer:
        masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, update_interval=3, seed=1))
        return Trainer(model, masker, digits06.train, train, moon, state_path=state_path)

    base = _model(digits06)
    full = trainer(copy.deepcopy(base)).run()

    state = tmp_path / "state.pt"
    first = trainer(copy.deepcopy(base), state)
    with pytest.raises(StopTraining):
        first.run(stop_after_epoch=stop_after)
    assert state.is_file()
    second = trainer(copy.deepcopy(base), state)
    second.load_state(state)
    assert second.start_epoch == stop_after + 1
    assert second.averaging is not None
    assert (second.averaging.averaged is not None) == (stop_after >= 3)
    resumed = second.run()

    for (k, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    for k in full.masks:
        assert torch.equal(full.masks[k], resumed.masks[k])


def test_resume_refuses_other_settings(digits06, tmp_path: Path) -> None:
    from moonprune.errors import ConfigError

    state = tmp_path / "state.pt"
    first = _trainer(_model(digits06), digits06, state_path=state)
    with pytest.raises(StopTraining):
        first.run(stop_after_epoch=0)
    other = _trainer(_model(digits06), digits06, moon=MoonConfig(warmup_epochs=2, average_epochs=1))
    with pytest.raises(ConfigError, match="other settings"):
        other.load_state(state)


def test_plain_baseline_trains_without_averaging(digits06) -> None:
    torch.manual_seed(0)
    model = demo_cnn(num_classes=6, width=4)
    trainer = _trainer(model, digits06, moon=MoonConfig(enabled=False))
    result = trainer.run()
    assert trainer.averaging is None and trainer.schedule is None
    assert result.model is model
    assert all(h.a is None for h in result.history)
    assert model(digits06.train.x[:2]).shape == (2, 6)


# 5 rows over 2 ranks: 3/2; 1 row: 1/0 (rank 1 has none). No process group needed.
@pytest.mark.parametrize("n_rows", [5, 1])
def test_data_parallel_shares_average_to_the_batch_mean_gradient(n_rows: int) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x, y = torch.randn(n_rows, 4), torch.randint(0, 2, (n_rows,))
    expected = torch.autograd.grad(unknown_aware_loss(layer(x), y, 0.5), layer.weight)[0]
    grads = []
    for rank in range(2):
        ctx = DistContext(rank, world_size=2)
        row_sum = unknown_aware_loss(layer(ctx.shard(x)), ctx.shard(y), 0.5, reduction="sum")
        loss = ctx.share_of_mean(row_sum, n_rows)
        assert torch.isfinite(loss)
        grads.append(torch.autograd.grad(loss, layer.weight)[0])
    # DDP averages the ranks' gradients
    torch.testing.assert_close((grads[0] + grads[1]) / 2, expected, rtol=0, atol=1e-6)


def test_batch_starts_fold_a_too_small_last_batch() -> None:
    assert batch_starts(130, 64) == [0, 64, 128]  # nothing folded by default
    assert batch_starts(129, 64, min_last=2) == [0, 64]  # 1 row joins the batch before
    assert batch_starts(130, 64, min_last=2) == [0, 64, 128]
    assert batch_starts(1, 64, min_last=2) == [0]  # a lone batch stays
    assert min_rows_per_batch(demo_cnn(num_classes=6, width=4), world_size=2) == 4
    assert min_rows_per_batch(torch.nn.Linear(3, 2)) == 1


def test_batchnorm1d_trains_when_the_last_batch_has_one_row(digits06) -> None:
    """len(train) % batch_size == 1 used to end in 'Expected more than 1 value per channel'."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Linear(16, 6),
    )  # fmt: skip
    add_unknown_output_(model, digits06.train.x[:2])
    train = ImageSet("t", digits06.train.x[:129], digits06.train.y[:129])
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.5, update_interval=1, seed=1))
    trainer = Trainer(model, masker, train, TrainConfig(epochs=2, batch_size=64), MOON)
    assert trainer.steps_per_epoch == 2
    result = trainer.run()
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)
    assert masker.updates > 0  # the update schedule counted the folded batch right


def test_batch_too_small_for_batchnorm_is_refused(digits06) -> None:
    model = _model(digits06)  # demo_cnn has BatchNorm
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.5, seed=1))
    with pytest.raises(ConfigError, match="--batch-size 1 leaves a batch with fewer than 2"):
        Trainer(model, masker, digits06.train, TrainConfig(epochs=1, batch_size=1), MOON)


@pytest.mark.parametrize("augment", ["none", "crop"])
def test_average_batchnorm_is_recalibrated_on_rows_augmented_as_in_training(
    digits06, augment: str
) -> None:
    # the reference recalibrates on its (flip-and-crop) training loader
    from moonprune.augment import crop_padding
    from moonprune.averaging import recompute_batchnorm

    train = dataclasses.replace(TRAIN, augment=augment)
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, update_interval=3, seed=1))
    trainer = Trainer(_model(digits06), masker, digits06.train, train, MOON)
    result = trainer.run()
    last = len(result.history) - 1
    rows = torch.cat(list(trainer._recalibration_batches(last)))
    clean = digits06.train.x
    assert rows.shape == clean.shape
    # the same epoch's rows without augmentation: the training set, shuffled
    trainer.cfg = dataclasses.replace(train, augment="none")
    shuffled = torch.cat(list(trainer._recalibration_batches(last)))
    assert not torch.equal(shuffled, clean)
    assert sorted(r.numpy().tobytes() for r in shuffled) == sorted(
        r.numpy().tobytes() for r in clean
    )
    if augment == "none":
        assert torch.equal(rows, shuffled)
    else:  # every row is its own clean row shifted by at most the crop's padding
        assert not torch.equal(rows, shuffled)
        h, w = clean.shape[-2:]
        pad = crop_padding(h, w)
        padded = torch.nn.functional.pad(shuffled, (pad,) * 4, mode="replicate")
        offsets = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        shifts = torch.stack([padded[..., dy : dy + h, dx : dx + w] for dy, dx in offsets])
        matches = (shifts == rows.unsqueeze(0)).flatten(2).all(dim=2).any(dim=0)
        assert bool(matches.all())
    trainer.cfg = train

    def bn_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
        return [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]

    # the averaged model's statistics are those of exactly these rows, not of the clean ones
    expected = copy.deepcopy(result.model)
    recompute_batchnorm(list(trainer._recalibration_batches(last)), expected)
    on_clean = copy.deepcopy(result.model)
    recompute_batchnorm(list(shuffled.split(256)), on_clean)
    got = bn_buffers(result.model)
    assert got and all(torch.equal(a, b) for a, b in zip(got, bn_buffers(expected), strict=True))
    same_as_clean = all(torch.equal(a, b) for a, b in zip(got, bn_buffers(on_clean), strict=True))
    assert same_as_clean == (augment == "none")


@pytest.mark.parametrize(
    "moon", [MoonConfig(enabled=False), MoonConfig(warmup_epochs=1, average_epochs=0)]
)
def test_a_run_without_an_average_ships_its_own_batchnorm_statistics(
    digits06, moon: MoonConfig
) -> None:
    # a few steps per epoch leave momentum-0.1 running statistics behind the weights;
    # the shipped network carries the statistics of its training rows (as the average does)
    model = demo_cnn(num_classes=6, width=4) if not moon.enabled else _model(digits06)
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, update_interval=3, seed=1))
    trainer = Trainer(model, masker, digits06.train, TRAIN, moon)
    result = trainer.run()
    assert result.model is model

    # by hand: each BatchNorm layer's input on the training rows, 256 at a time (shuffled
    # as the recalibration reads them), in train mode; the statistics are the row-weighted
    # means of the per-batch mean and unbiased variance (the reference's bn_update)
    rows = torch.cat(list(trainer._recalibration_batches(TRAIN.epochs)))
    assert rows.shape == digits06.train.x.shape and not torch.equal(rows, digits06.train.x)
    probe = copy.deepcopy(result.model).train()
    seen: dict[str, list[torch.Tensor]] = {}
    layers = [(n, m) for n, m in probe.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for name, layer in layers:
        layer.register_forward_pre_hook(lambda _m, a, n=name: seen.setdefault(n, []).append(a[0]))
    with torch.no_grad():
        for x in rows.split(256):
            probe(x)
    assert layers
    for name, _ in layers:
        batches = seen[name]
        rows = torch.tensor([float(len(b)) for b in batches])[:, None]
        assert len(set(rows.flatten().tolist())) > 1  # a smaller last batch: weights matter
        mean = (torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]) * rows).sum(0) / rows.sum()
        var = torch.stack([b.transpose(0, 1).flatten(1).var(dim=1) for b in batches])
        var = (var * rows).sum(0) / rows.sum()
        bn = result.model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)


def test_batchnorm_recalibration_matches_the_reference_bn_update() -> None:
    # a hand copy of openood/utils/average.py:35-65 (StevenBoys/MOON): reset, then
    # momentum b / (n + b) per batch; torch's update_bn weights batches equally instead
    from torch.optim.swa_utils import update_bn

    from moonprune.averaging import recompute_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5),
    )  # fmt: skip
    model.eval()
    batches = [torch.randn(n, 1, 8, 8) * (1 + i) for i, n in enumerate((16, 16, 3))]

    def reference_bn_update(loader: list[torch.Tensor], net: torch.nn.Module) -> None:
        net.train()
        momenta = {}
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean = torch.zeros_like(m.running_mean)
                m.running_var = torch.ones_like(m.running_var)
                momenta[m] = m.momentum
        n = 0
        for x in loader:
            b = x.size(0)
            for m in momenta:
                m.momentum = b / (n + b)
            net(x)
            n += b
        for m, momentum in momenta.items():
            m.momentum = momentum

    expected, equal_weights, got = (copy.deepcopy(model) for _ in range(3))
    with torch.no_grad():
        reference_bn_update(batches, expected)
    update_bn(batches, equal_weights)
    recompute_batchnorm(batches, got)
    assert not got.training and got[1].momentum == 0.1  # mode and momenta restored

    def stats(net: torch.nn.Module) -> list[torch.Tensor]:
        return [b for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))]

    for a, b, c in zip(stats(got), stats(expected), stats(equal_weights), strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)


def test_recalibration_batches_mix_the_classes_of_a_class_sorted_set(digits06) -> None:
    # an image folder is read class by class; batches of it in storage order would each
    # hold one or two classes and miss the spread between them (the reference shuffles)
    by_class = torch.argsort(digits06.train.y, stable=True)
    train = dataclasses.replace(
        digits06.train, x=digits06.train.x[by_class], y=digits06.train.y[by_class]
    )
    label = {r.numpy().tobytes(): int(c) for r, c in zip(train.x, train.y, strict=True)}
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, seed=1))
    trainer = Trainer(_model(digits06), masker, train, TRAIN, MOON)

    def classes(epoch: int) -> list[set[int]]:
        return [
            {label[r.numpy().tobytes()] for r in x} for x in trainer._recalibration_batches(epoch)
        ]

    in_storage_order = [set(y.tolist()) for y in train.y.split(256)]
    assert max(len(c) for c in in_storage_order) <= 3
    assert [len(c) for c in classes(0)] == [6, 6, 6]
    first = torch.cat(list(trainer._recalibration_batches(0)))
    assert torch.equal(first, torch.cat(list(trainer._recalibration_batches(0))))  # seeded
    assert not torch.equal(first, torch.cat(list(trainer._recalibration_batches(1))))
    trainer.dist = DistContext(rank=1, world_size=2)  # every rank recomputes the same
    assert torch.equal(first, torch.cat(list(trainer._recalibration_batches(0))))


def test_recalibration_adds_the_synthesized_rows_as_training_does(digits06) -> None:
    # training forwards each batch with its synthesized input-space rows, so BatchNorm's
    # statistics are recomputed on batches that hold them too, the same on every rank
    moon = dataclasses.replace(MOON, unknowns="blur+vos", unknowns_fraction=0.25)
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, seed=1))
    trainer = Trainer(_model(digits06), masker, digits06.train, TRAIN, moon)
    without = _trainer(_model(digits06), digits06)
    id_rows = list(without._recalibration_batches(2))
    batches = list(trainer._recalibration_batches(2))
    # vos lives in feature space (after BatchNorm): only blur's share is added
    assert [len(b) for b in batches] == [
        len(x) + (rows_for(len(x), 0.25) + 1) // 2 for x in id_rows
    ]
    for x, b in zip(id_rows, batches, strict=True):
        assert torch.equal(b[: len(x)], x)
        assert torch.isfinite(b).all() and not torch.equal(b[len(x) :], x[: len(b) - len(x)])
    trainer.dist = DistContext(rank=1, world_size=2)
    again = list(trainer._recalibration_batches(2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
