"""Process groups for sequence parallelism (rings) x data parallelism.

World = dp x ring. Rings are blocks of consecutive ranks (ranks 0..C-1 form ring 0, so a
ring stays inside a node when C divides the GPUs per node); the data-parallel group of a
rank holds the ranks with the same position in every ring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=10)
TIMEOUT_ENV = "HF_RING_TIMEOUT"  # seconds


def default_timeout() -> timedelta:
    """The collective timeout of every group the package creates: ``$HF_RING_TIMEOUT`` seconds, else 10 min.

    torch's own default is 30 min (gloo) and a stalled peer would block the others that long.

    Raises:
        ValueError: the environment variable is not a positive number.
    """
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds (e.g. 600)")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class RingGroups:
    """The groups one rank belongs to.

    Attributes:
        ring_group: process group of this rank's ring (None when the world is one process).
        ring_rank: position in the ring (which zigzag shard this rank holds).
        ring_size: C, processes per ring (one sequence is split C ways).
        dp_group: process group of the ranks holding the same shard in every ring (None if dp == 1).
        dp_rank: index of this rank's ring (which batch it sees).
        dp_size: number of rings (data-parallel replicas of one sequence).
        timeout: the collective timeout of these groups.
        sp_group / sp_rank / sp_size: every rank that holds a part of the same sequences (the
            sequence-parallel group; the ring itself until an all-to-all dimension is added).
    """

    ring_group: dist.ProcessGroup | None
    ring_rank: int
    ring_size: int
    dp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int
    timeout: timedelta = DEFAULT_TIMEOUT

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.ring_group

    @property
    def sp_rank(self) -> int:
        return self.ring_rank

    @property
    def sp_size(self) -> int:
        return self.ring_size

    @property
    def world_size(self) -> int:
        """dp x ring: every rank of the job."""
        return self.sp_size * self.dp_size


def setup_groups(ring_size: int, *, timeout: timedelta | float | None = None) -> RingGroups:
    """Create the ring and data-parallel groups from the launcher's state.

    Under ``accelerate launch`` / ``torchrun`` the process group is initialised through
    accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA) if it is not already. A single
    process without a launcher gets ring_size 1. A collective: every rank calls it.

    Args:
        ring_size: processes per ring; must divide the world size.
        timeout: collective timeout of every group created here (and of the default group when
            this call initialises it): a timedelta or seconds; default ``$HF_RING_TIMEOUT`` or 10 min.

    Returns:
        RingGroups for this rank.

    Raises:
        ValueError: ring_size < 1 or it does not divide the world size; a bad timeout.
    """
    if not isinstance(ring_size, int) or isinstance(ring_size, bool) or ring_size < 1:
        raise ValueError(f"ring_size={ring_size!r} must be a positive int")
    if timeout is None:
        timeout = default_timeout()
    elif not isinstance(timeout, timedelta):
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be a timedelta or a positive number of seconds")
        timeout = timedelta(seconds=timeout)
    if not dist.is_initialized():
        import torch
        from accelerate import PartialState

        # Initialises torch.distributed when launched with several processes; on CPU-only
        # machines accelerate must be told cpu=True or it reports a single process.
        PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)
    if not dist.is_initialized():
        if ring_size != 1:
            raise ValueError(f"ring_size={ring_size} needs {ring_size} processes; launch with "
                             f"`accelerate launch --num_processes {ring_size} ...` or torchrun")
        return RingGroups(None, 0, 1, None, 0, 1, timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ring_size != 0:
        raise ValueError(f"ring_size={ring_size} does not divide the world size {world}; choose a divisor of "
                         f"{world} or launch a multiple of {ring_size} processes")
    dp = world // ring_size
    ring_group = dp_group = None
    # Every rank must create every group, in the same order.
    for d in range(dp):
        g = dist.new_group(list(range(d * ring_size, (d + 1) * ring_size)), timeout=timeout)
        if rank // ring_size == d:
            ring_group = g
    if dp > 1:
        for c in range(ring_size):
            g = dist.new_group(list(range(c, world, ring_size)), timeout=timeout)
            if rank % ring_size == c:
                dp_group = g
    return RingGroups(ring_group, rank % ring_size, ring_size, dp_group, rank // ring_size, dp, timeout)
