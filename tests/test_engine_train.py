"""engine.train: one epoch changes the weights, non-finite predictions stop before the matching and non-finite
losses before the step, autocast runs; the epochs that are checkpointed and evaluated."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from engine.amp import build_grad_scaler
from engine.optim import build_optimizer
from engine.train import NonFiniteLossError, checkpoint_due, evaluation_due, numerics, train_one_epoch
from models import build_model
from tests.tiny_training import CONFIG, TINY, tiny_batches
from util.config import load_config


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


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_predictions_stop_before_the_matching_and_the_step(tiny, value):
    model, criterion, cfg = tiny
    with torch.no_grad():
        model.class_embed[0].bias[2] = value  # every query's class-2 logit
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError) as stopped:
        train_one_epoch(model, criterion, tiny_batches(), build_optimizer(model, cfg), torch.device("cpu"), 4)
    assert str(stopped.value) == (
        "epoch 4, iteration 0: the model's predictions are not finite (pred_logits (20 of 120 values)); "
        "training stopped before the matching and the optimizer step"
    )
    assert all(torch.equal(before[name].nan_to_num(), p.nan_to_num()) for name, p in model.named_parameters())


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


def test_checkpoints_are_kept_every_save_every_epochs_and_before_the_lr_drop():
    cfg = dataclasses.replace(load_config(CONFIG, overrides=TINY), save_every=3, lr_drop=5)
    assert [epoch for epoch in range(10) if checkpoint_due(epoch, cfg)] == [2, 4, 5, 8]
    assert not any(checkpoint_due(epoch, dataclasses.replace(cfg, save_every=0)) for epoch in range(10))


def test_the_last_epoch_and_every_eval_every_are_evaluated():
    cfg = dataclasses.replace(load_config(CONFIG, overrides=TINY), epochs=7, eval_every=3)
    assert [epoch for epoch in range(7) if evaluation_due(epoch, cfg)] == [2, 5, 6]
    assert [epoch for epoch in range(7) if evaluation_due(epoch, dataclasses.replace(cfg, eval_every=0))] == [6]


@pytest.mark.parametrize(("count", "threads"), [(2, "2 threads"), (1, "1 thread")])
def test_the_start_line_names_what_besides_the_seed_fixes_the_numbers(monkeypatch, count, threads):
    cfg = load_config(CONFIG, overrides=TINY)  # attention_backend=pytorch
    monkeypatch.setattr(torch, "get_num_threads", lambda: count)
    cpu = torch.device("cpu")
    assert numerics(cfg, "none", cpu) == f"float32, {threads}, attention pytorch"
    assert numerics(cfg, "bfloat16", cpu) == f"bfloat16 autocast, {threads}, attention pytorch"
