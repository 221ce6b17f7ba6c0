"""engine.training: one epoch changes the weights, non-finite losses stop before the step, autocast runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from datasets import Batch
from engine.optim import build_optimizer
from engine.training import (
    NonFiniteLossError,
    autocast_dtype,
    build_grad_scaler,
    prepare_for_training,
    resolve_amp,
    to_float32,
    train_one_epoch,
)
from models import build_model
from tests.tiny_training import CONFIG, TINY
from util.config import load_config


def tiny_batches(count: int = 2) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    return [
        Batch(torch.randn(2, 3, 64, 64, generator=generator), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
        for _ in range(count)
    ]


class NanCriterion(nn.Module):
    """A criterion whose loss is NaN: the weights must not move."""

    weight_dict = {"loss_ce": 1.0}  # noqa: RUF012 (read only)

    def forward(self, outputs, targets):
        return {"loss_ce": outputs["pred_logits"].sum() * math.nan}

    def total_loss(self, losses):
        return losses["loss_ce"]


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    cfg = load_config(CONFIG, overrides=TINY)
    model, criterion, _ = build_model(cfg)
    return model, criterion, cfg


def test_an_epoch_updates_the_weights_and_returns_average_losses(tiny):
    model, criterion, cfg = tiny
    before = model.class_embed[0].weight.detach().clone()
    averages = train_one_epoch(
        model, criterion, tiny_batches(), build_optimizer(model, cfg), torch.device("cpu"), 0, clip_max_norm=0.1
    )
    assert not torch.equal(before, model.class_embed[0].weight)
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "class_error"} <= set(averages)
    assert all(math.isfinite(value) for value in averages.values())


def test_non_finite_loss_stops_before_the_optimizer_step(tiny):
    model, _, cfg = tiny
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="epoch 3, iteration 0: the loss is nan"):
        train_one_epoch(model, NanCriterion(), tiny_batches(), build_optimizer(model, cfg), torch.device("cpu"), 3)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_bfloat16_autocast_trains_with_finite_losses(tiny):
    model, criterion, cfg = tiny
    averages = train_one_epoch(
        model,
        criterion,
        tiny_batches(1),
        build_optimizer(model, cfg),
        torch.device("cpu"),
        0,
        amp="bfloat16",
        scaler=build_grad_scaler("bfloat16", torch.device("cpu")),
    )
    assert math.isfinite(averages["loss"])


def test_unknown_amp_mode_is_named():
    assert autocast_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="amp must be one of"):
        autocast_dtype("fp8")


@pytest.mark.parametrize(("init_scale", "steps"), [(2.0**10, True), (2.0**100, False)])
def test_float16_gradient_scaling_steps_or_skips_with_the_fused_optimizer(tiny, init_scale, steps):
    model, criterion, cfg = tiny
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    averages = train_one_epoch(
        model,
        criterion,
        tiny_batches(1),
        optimizer,
        torch.device("cpu"),
        0,
        clip_max_norm=0.1,
        amp="float16",
        scaler=scaler,
    )
    assert math.isfinite(averages["loss"])
    changed = [not torch.equal(before[name], p) for name, p in model.named_parameters() if p.requires_grad]
    if steps:  # a scale that fits float16: the step is taken and the scale kept
        assert any(changed) and scaler.get_scale() == init_scale
    else:  # the scaled gradients overflow: the step is skipped, nothing moves, the scale shrinks
        assert not any(changed) and scaler.get_scale() < init_scale


def test_auto_amp_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bfloat16"), (False, "none")):
        monkeypatch.setattr("engine.training.native_bfloat16", lambda device, native=native: native)
        assert resolve_amp("auto", cpu) == expected
    assert resolve_amp("float16", cpu) == "float16"  # a named mode is kept as it is
    monkeypatch.undo()
    assert resolve_amp("auto", torch.device("cuda")) == "none"


def test_bfloat16_training_stores_the_backbone_channels_last_and_computes_the_same_step(tiny):
    """channels-last changes the memory layout only: the same batch gives the same losses and gradients (up to
    bfloat16 rounding, which the layouts' different summation orders expose)."""
    model, criterion, _ = tiny
    fast = copy.deepcopy(model)
    prepare_for_training(fast, "bfloat16", torch.device("cpu"))
    conv = fast.backbone[0].body.layer2[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone[0].body.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    (batch,) = tiny_batches(1)
    losses = []
    for network in (model, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = network(batch.images, batch.padding_mask)
        loss = criterion.total_loss(criterion(to_float32(outputs), batch.targets))
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    gradient, fast_gradient = model.input_proj[0][0].weight.grad, fast.input_proj[0][0].weight.grad
    assert torch.nn.functional.cosine_similarity(gradient.flatten(), fast_gradient.flatten(), dim=0) > 0.99

    prepare_for_training(model, "none", torch.device("cpu"))  # float32: the layout is left alone
    assert not model.backbone[0].body.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
