"""models.dropout: the mask's distribution (kept share, scale, mean, variance, every 16-bit slice of a draw),
independence within a mask and across calls, seeding, gradient, and a model with dropout that still trains.

The statistical bounds are six standard deviations of the estimate: a correct mask fails them about once in 10^8
runs, while a wrong keep share (p off by 2^-10), a biased slice (the int64 default range leaves the top bit 0)
or a repeated mask fails them every time."""

from __future__ import annotations

import math

import pytest
import torch

from engine.optim import build_optimizer
from engine.train import forward_losses
from models import build_model
from models.dropout import LEVELS, Dropout, drop_levels, dropout, scaled_keep_mask
from tests.tiny_training import CONFIG, TINY, tiny_batches
from util.config import load_config

COUNT = 1 << 22  # elements per mask
SIGMAS = 6.0


def within(estimate: float, expected: float, variance_of_one: float, count: int) -> bool:
    """Whether the mean of ``count`` independent values of variance ``variance_of_one`` is within SIGMAS standard
    deviations of ``expected``."""
    return abs(estimate - expected) <= SIGMAS * math.sqrt(variance_of_one / count)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_slice_keeps_its_element_with_probability_one_minus_p_scaled_by_its_inverse(p):
    torch.manual_seed(0)
    mask = scaled_keep_mask((COUNT,), p, torch.float32)
    kept_probability = 1 - drop_levels(p) / LEVELS
    assert abs(kept_probability - (1 - p)) <= 2.0**-17
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / kept_probability])
    kept = (mask > 0).double()
    assert within(kept.mean().item(), 1 - p, p * (1 - p), COUNT)
    for slice_index in range(4):  # the four 16-bit slices of each 64-bit draw
        share = kept[slice_index::4].mean().item()
        assert within(share, 1 - p, p * (1 - p), COUNT // 4), f"slice {slice_index}: kept share {share}"


def test_the_mask_has_mean_one_and_variance_p_over_one_minus_p():
    p = 0.1
    torch.manual_seed(1)
    mask = scaled_keep_mask((COUNT,), p, torch.float32).double()
    variance = p / (1 - p)  # of a value that is 1 / (1 - p) with probability 1 - p, else 0
    assert within(mask.mean().item(), 1.0, variance, COUNT)
    fourth_moment = p**4 / (1 - p) ** 3 + p  # E[(m - 1)^4]: m - 1 is p / (1 - p) or -1
    assert within(mask.var().item(), variance, fourth_moment - variance**2, COUNT)


def test_neighbouring_elements_and_successive_masks_are_independent():
    p = 0.1
    torch.manual_seed(2)
    first = scaled_keep_mask((COUNT,), p, torch.float32) > 0
    second = scaled_keep_mask((COUNT,), p, torch.float32) > 0
    both_kept = (first & second).double().mean().item()
    assert within(both_kept, (1 - p) ** 2, (1 - p) ** 2 * (1 - (1 - p) ** 2), COUNT)
    neighbours_dropped = (~first[:-1] & ~first[1:]).double().mean().item()
    assert within(neighbours_dropped, p**2, 3 * p**2, COUNT)  # overlapping pairs: variance at most 3x


def test_the_same_seed_gives_the_same_mask_and_eval_mode_or_p_zero_leave_the_input():
    torch.manual_seed(3)
    first = scaled_keep_mask((3, 1000), 0.1, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(first, scaled_keep_mask((3, 1000), 0.1, torch.float32))
    layer, values = Dropout(0.1), torch.randn(4, 5)
    assert layer.eval()(values) is values
    assert torch.equal(dropout(values, 0.0), values)


def test_the_output_is_the_input_times_the_mask_and_so_is_the_gradient():
    values = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(4)
    output = dropout(values, 0.3)
    torch.manual_seed(4)
    mask = scaled_keep_mask(values.shape, 0.3, values.dtype)
    assert torch.equal(output, values * mask)
    output.sum().backward()
    assert torch.equal(values.grad, mask)


def test_a_bfloat16_input_gets_a_bfloat16_mask_with_the_scale_rounded_to_bfloat16():
    values = torch.ones(4096, dtype=torch.bfloat16)
    output = dropout(values, 0.1)
    assert output.dtype == torch.bfloat16
    scale = torch.tensor(LEVELS / (LEVELS - drop_levels(0.1))).bfloat16().item()
    assert set(output.unique().tolist()) == {0.0, scale}


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_a_probability_outside_zero_to_one_is_refused(p):
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        Dropout(p)


def test_a_model_with_dropout_still_learns_a_batch():
    torch.manual_seed(0)
    cfg = load_config(CONFIG, overrides=[*TINY, "dropout=0.1", "lr=1e-3"])
    model, criterion, _ = build_model(cfg)
    model.train()
    optimizer = build_optimizer(model, cfg)
    batch = tiny_batches(1)[0]
    losses = []
    for _ in range(15):
        _, loss = forward_losses(model, criterion, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    model.eval()
    with torch.no_grad():
        first, second = (model(batch.images, batch.padding_mask)["pred_logits"] for _ in range(2))
        assert torch.equal(first, second)
