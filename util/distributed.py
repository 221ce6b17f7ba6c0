"""Process-group helpers: start from torchrun's environment, know this process's rank, gather Python objects.

One process: nothing is initialised and every helper answers as the only rank. Under ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment) the default group starts
with ``init_method="env://"``, NCCL for CUDA devices and gloo for the CPU, and a collective timeout
(``dist_timeout_minutes`` in the config): a rank that stops answering ends the job instead of leaving the others
waiting forever. With gloo every waiting rank raises :class:`CollectiveTimeoutError` inside
:func:`explaining_timeouts`; NCCL's watchdog aborts the processes itself, printing the collective that timed out.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from util.errors import RunError, UserError


@dataclass(frozen=True)
class DistributedInfo:
    """This process's place: ``rank`` of ``world_size``, ``local_rank`` on its machine, the ``device`` it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"cpu"``, ``"cuda"`` (this process's GPU ``local_rank``) or ``"cuda:N"``, checked to exist."""
    if device == "cpu":
        return torch.device("cpu")
    if not device.startswith("cuda"):
        raise UserError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available here; set device=cpu (e.g. --opts device=cpu)")
    return torch.device(device if ":" in device else f"cuda:{local_rank}")


def init_distributed(device: str, timeout_minutes: float = 30.0) -> DistributedInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` set), else run as the only process.

    ``timeout_minutes`` bounds every collective (and the start-up rendezvous): after it, a rank still waiting for
    another gives up (see :func:`explaining_timeouts`).
    """
    if not timeout_minutes > 0:
        raise UserError(f"dist_timeout_minutes must be positive, got {timeout_minutes!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


class CollectiveTimeoutError(RunError):
    """A collective (gradient all-reduce, barrier, gather) got no answer from some rank within the timeout."""


def is_collective_timeout(error: RuntimeError) -> bool:
    """Whether ``error`` is a process group's timeout (gloo raises a plain RuntimeError naming its transport)."""
    text = str(error).lower()
    return ("timed out" in text or "timeout" in text) and (isinstance(error, dist.DistError) or "gloo" in text)


@contextmanager
def explaining_timeouts(timeout_minutes: float) -> Iterator[None]:
    """Turn a collective's timeout inside the block into a :class:`CollectiveTimeoutError` that says which rank
    reports it and which rank(s) did not answer."""
    try:
        yield
    except RuntimeError as error:
        if not is_distributed() or not is_collective_timeout(error):
            raise
        rank, world_size = dist.get_rank(), dist.get_world_size()
        others = [other for other in range(world_size) if other != rank]
        silent = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
        raise CollectiveTimeoutError(
            f"rank {rank} of {world_size} waited {timeout_minutes:g} minute(s) (dist_timeout_minutes) in a "
            f"collective and {silent} did not answer: it stopped or hangs (look at its output). Raise "
            "dist_timeout_minutes if a step legitimately takes longer"
        ) from error


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process); objects travel pickled."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process); objects travel pickled."""
    if not is_distributed():
        return obj
    carried = [obj]
    dist.broadcast_object_list(carried, src=0)
    return carried[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over ranks (a copy; ``values`` itself in one process)."""
    if not is_distributed():
        return values
    reduced = values.clone()
    dist.all_reduce(reduced)
    return reduced / dist.get_world_size()
