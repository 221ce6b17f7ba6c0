"""engine.optim: which parameter trains at which learning rate, and the step schedule."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engine.optim import (
    GROUP_NAMES,
    build_lr_scheduler,
    build_optimizer,
    parameter_group,
)
from models import build_model
from tests.tiny_training import CONFIG
from util.checkpoint import load_checkpoint, restore_training_state, save_checkpoint
from util.config import load_config

TINY_MODEL = [
    "pretrained_backbone=false",
    "backbone=resnet18",
    "hidden_dim=32",
    "dim_feedforward=32",
    "nheads=2",
    "enc_layers=1",
    "dec_layers=1",
    "num_queries=4",
    "num_classes=6",
    "lr=1e-3",
    "lr_backbone=1e-4",
    "lr_linear_proj_mult=0.1",
]


@pytest.fixture(scope="module")
def model_and_config():
    cfg = load_config(CONFIG, overrides=TINY_MODEL)
    return build_model(cfg)[0], cfg


def expected_group(name: str) -> str:
    if name.startswith("backbone.0."):
        return "backbone"
    if ".sampling_offsets." in name or name.startswith("transformer.reference_points."):
        return "linear_proj"
    return "rest"


def test_every_trainable_parameter_is_in_its_expected_group_once(model_and_config):
    model, cfg = model_and_config
    optimizer = build_optimizer(model, cfg)
    by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert expected_group(by_id[id(parameter)]) == group["name"], by_id[id(parameter)]
            seen.append(id(parameter))
    trainable = [id(parameter) for parameter in model.parameters() if parameter.requires_grad]
    assert sorted(seen) == sorted(trainable)


def test_groups_have_the_configured_learning_rates(model_and_config):
    model, cfg = model_and_config
    optimizer = build_optimizer(model, cfg)
    assert [group["name"] for group in optimizer.param_groups] == list(GROUP_NAMES)
    learning_rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert learning_rates == pytest.approx({"rest": 1e-3, "backbone": 1e-4, "linear_proj": 1e-4})
    assert all(group["weight_decay"] == cfg.weight_decay for group in optimizer.param_groups)
    assert all(len(group["params"]) > 0 for group in optimizer.param_groups)


def test_frozen_backbone_stages_are_not_optimised(model_and_config):
    model, cfg = model_and_config
    optimised = {id(p) for group in build_optimizer(model, cfg).param_groups for p in group["params"]}
    frozen = [name for name, p in model.named_parameters() if name.startswith("backbone.0.body.layer1.")]
    assert frozen and not any(id(dict(model.named_parameters())[name]) in optimised for name in frozen)


def test_sampling_offsets_and_reference_points_are_named_in_the_linear_proj_group():
    assert (
        parameter_group(
            "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
            ["backbone.0"],
            ["reference_points", "sampling_offsets"],
        )
        == "linear_proj"
    )
    assert (
        parameter_group("transformer.reference_points.bias", ["backbone.0"], ["reference_points", "sampling_offsets"])
        == "linear_proj"
    )
    assert parameter_group("backbone.0.body.layer2.0.conv1.weight", ["backbone.0"], ["sampling_offsets"]) == "backbone"
    assert parameter_group("input_proj.0.0.weight", ["backbone.0"], ["sampling_offsets"]) == "rest"


def test_step_schedule_drops_every_group_tenfold_at_lr_drop(model_and_config):
    model, _ = model_and_config
    cfg = load_config(CONFIG, overrides=[*TINY_MODEL, "lr_drop=2"])
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)
    before = [group["lr"] for group in optimizer.param_groups]
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([lr * 0.1 for lr in before])


def test_zero_lr_drop_is_refused(model_and_config):
    model, _ = model_and_config
    # load_config refuses lr_drop=0 itself (tests/test_util_config.py); the scheduler guards a Config made in code
    cfg = dataclasses.replace(load_config(CONFIG, overrides=TINY_MODEL), lr_drop=0)
    with pytest.raises(ValueError, match="lr_drop"):
        build_lr_scheduler(build_optimizer(model, cfg), cfg)


def test_cpu_optimizer_is_fused_and_matches_the_per_parameter_update(model_and_config):
    model, cfg = model_and_config
    optimizer = build_optimizer(model, cfg)
    assert all(group["fused"] for group in optimizer.param_groups)
    reference_model = copy.deepcopy(model)
    reference = torch.optim.AdamW(
        [
            dict(group, fused=None, foreach=False)  # the per-parameter loop
            for group in build_optimizer(reference_model, cfg).param_groups
        ]
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for fused_param, reference_param in zip(model.parameters(), reference_model.parameters()):
            if fused_param.requires_grad:
                gradient = torch.randn(fused_param.shape, generator=generator)
                fused_param.grad, reference_param.grad = gradient.clone(), gradient.clone()
        optimizer.step()
        reference.step()
    for (name, fused_param), reference_param in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(fused_param, reference_param, rtol=1e-5, atol=1e-6, msg=name)


def original_format_training_state(optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict:
    """What the original code (torch 1.x AdamW and StepLR, 50 epochs, drop at 40) saved after epoch 49: an int
    ``step``, param groups without the keys newer torch adds, and no group names."""
    index, state, groups = 0, {}, []
    for group in optimizer.param_groups:
        lr = group["lr"] * 0.1
        ids = []
        for parameter in group["params"]:
            state[index] = {
                "step": 4000,
                "exp_avg": torch.randn(parameter.shape, generator=generator) * 1e-3,
                "exp_avg_sq": torch.rand(parameter.shape, generator=generator) * 1e-6,
            }
            ids.append(index)
            index += 1
        groups.append(
            {
                "lr": lr,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 1e-4,
                "amsgrad": False,
                "initial_lr": lr * 10,
                "params": ids,
            }
        )
    scheduler = {
        "step_size": 40,
        "gamma": 0.1,
        "base_lrs": [group["initial_lr"] for group in groups],
        "last_epoch": 50,
        "_step_count": 51,
        "verbose": False,
        "_get_lr_called_within_step": False,
        "_last_lr": [group["lr"] for group in groups],
    }
    return {"optimizer": {"state": state, "param_groups": groups}, "lr_scheduler": scheduler, "epoch": 49}


def test_an_original_checkpoints_optimizer_state_resumes_with_the_adamw_update(model_and_config, tmp_path):
    model, cfg = model_and_config
    model = copy.deepcopy(model)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(1)
    save_checkpoint(
        {"model": model.state_dict(), **original_format_training_state(optimizer, generator)}, tmp_path / "original.pth"
    )
    checkpoint = load_checkpoint(tmp_path / "original.pth")
    assert restore_training_state(checkpoint, optimizer, build_lr_scheduler(optimizer, cfg)) == 50
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    saved = copy.deepcopy(checkpoint["optimizer"])  # the optimizer updates the loaded tensors in place
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.randn(parameter.shape, generator=generator)
    optimizer.step()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    by_id = {id(p): name for name, p in trained}
    ordered = [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]
    lrs = [group["lr"] for group in saved["param_groups"] for _ in group["params"]]
    for index, (name, lr) in enumerate(zip(ordered, lrs)):
        parameter, old = dict(trained)[name], saved["state"][index]
        exp_avg = 0.9 * old["exp_avg"] + 0.1 * parameter.grad
        exp_avg_sq = 0.999 * old["exp_avg_sq"] + 0.001 * parameter.grad**2
        step = 4001
        denominator = (exp_avg_sq / (1 - 0.999**step)).sqrt() + 1e-8
        expected = before[name] * (1 - lr * 1e-4) - lr * exp_avg / (1 - 0.9**step) / denominator
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
        assert float(optimizer.state[parameter]["step"]) == step
