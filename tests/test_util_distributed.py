"""util.distributed in one process: a collective timeout is told from other errors, and its setting is checked.
(Several processes: tests/test_distributed_torchrun.py.)"""

from __future__ import annotations

import pytest

from util.distributed import explaining_timeouts, init_distributed, is_collective_timeout
from util.errors import UserError

GLOO_TIMEOUT = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv "
    "operation to complete"
)


def test_gloo_timeouts_are_collective_timeouts_and_a_data_loader_timeout_is_not():
    assert is_collective_timeout(RuntimeError(GLOO_TIMEOUT))
    assert not is_collective_timeout(RuntimeError("DataLoader timed out after 5 seconds"))


def test_errors_pass_unchanged_without_a_process_group():
    with pytest.raises(RuntimeError, match="Timed out waiting 5000ms"), explaining_timeouts(30.0):
        raise RuntimeError(GLOO_TIMEOUT)


@pytest.mark.parametrize("minutes", [0, -1.0])
def test_a_timeout_that_is_not_positive_is_refused_naming_the_key(minutes):
    with pytest.raises(UserError, match="dist_timeout_minutes must be positive"):
        init_distributed("cpu", minutes)
