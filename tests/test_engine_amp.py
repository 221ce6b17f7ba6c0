"""engine.amp: the autocast dtype named by amp, "auto" resolved per device, the channels-last layout of bfloat16
training on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.amp import autocast, autocast_dtype, prepare_for_training, resolve_amp, to_float32
from models import build_model
from tests.tiny_training import CONFIG, TINY, tiny_batches
from util.config import load_config


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    model, criterion, _ = build_model(load_config(CONFIG, overrides=TINY))
    return model, criterion


def test_unknown_amp_mode_is_named():
    assert autocast_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="amp must be one of"):
        autocast_dtype("fp8")


def test_autocast_multiplies_in_the_named_dtype_and_none_in_float32():
    matrix = torch.randn(4, 4)
    for amp, expected in (("none", torch.float32), ("bfloat16", torch.bfloat16)):
        with autocast(amp, torch.device("cpu")):
            assert (matrix @ matrix).dtype == expected


def test_auto_amp_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bfloat16"), (False, "none")):
        monkeypatch.setattr("engine.amp.native_bfloat16", lambda device, native=native: native)
        assert resolve_amp("auto", cpu) == expected
    assert resolve_amp("float16", cpu) == "float16"  # a named mode is kept as it is
    monkeypatch.undo()
    assert resolve_amp("auto", torch.device("cuda")) == "none"


def test_bfloat16_training_stores_the_backbone_channels_last_and_computes_the_same_step(tiny):
    """channels-last changes the memory layout only: the same batch gives the same losses and gradients (up to
    bfloat16 rounding, which the layouts' different summation orders expose)."""
    model, criterion = tiny
    fast = copy.deepcopy(model)
    prepare_for_training(fast, "bfloat16", torch.device("cpu"))
    conv = fast.backbone[0].body.layer2[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone[0].body.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    (batch,) = tiny_batches(1)
    losses = []
    for network in (model, fast):
        with autocast("bfloat16", torch.device("cpu")):
            outputs = network(batch.images, batch.padding_mask)
        loss = criterion.total_loss(criterion(to_float32(outputs), batch.targets))
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    gradient, fast_gradient = model.input_proj[0][0].weight.grad, fast.input_proj[0][0].weight.grad
    assert torch.nn.functional.cosine_similarity(gradient.flatten(), fast_gradient.flatten(), dim=0) > 0.99

    prepare_for_training(model, "none", torch.device("cpu"))  # float32: the layout is left alone
    assert not model.backbone[0].body.layer2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
