"""Process groups for sequence parallelism (Ulysses x ring) x data parallelism.

World = dp x ulysses x ring, W = dp * U * C. Rank layout (global rank g):

    sp group      = the U * C consecutive ranks that share one sequence: g // (U * C) is the dp rank
    ulysses group = U consecutive ranks inside it (the fastest links: one node, NVLink)
    ring          = the C ranks with the same ulysses rank in the sp group (stride U): the ring
                    spans the Ulysses groups, so its point-to-point hops cross the slower links
    dp group      = the ranks with the same position in every sp group (stride U * C)

    sp_rank = g % (U * C) = ring_rank * U + ulysses_rank

Example, 8 ranks, dp 2 x U 2 x C 2: sp groups [0-3] and [4-7]; Ulysses groups [0,1] [2,3] [4,5] [6,7];
rings [0,2] [1,3] [4,6] [5,7]; dp groups [0,4] [1,5] [2,6] [3,7]. With U = 1 this is the plain layout
of rings of consecutive ranks (ranks 0..C-1 form ring 0).
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


_UNSET = object()


@dataclass(frozen=True)
class RingGroups:
    """The groups one rank belongs to (see the module docstring for the rank layout).

    Attributes:
        ring_group: process group of this rank's ring (None when the world is one process).
        ring_rank: position in the ring (which zigzag shard of the sequence its Ulysses group holds).
        ring_size: C, processes per ring.
        dp_group: process group of the ranks holding the same shard in every sp group (None if dp == 1).
        dp_rank: index of this rank's sp group (which batch it sees).
        dp_size: number of sp groups (data-parallel replicas of one sequence).
        timeout: the collective timeout of these groups.
        ulysses_group: the U consecutive ranks exchanging heads by all-to-all (None when U == 1).
        ulysses_rank: position in the Ulysses group (which contiguous piece of the ring shard, and
            after the all-to-all which heads, this rank holds).
        ulysses_size: U, processes per Ulysses group.
        sp_group / sp_rank / sp_size: every rank that holds a part of the same sequences (U * C ranks;
            the ring itself when U == 1, the Ulysses group when C == 1); sp_rank = ring_rank * U +
            ulysses_rank, the order of the shards along the sequence layout.

    ``RingGroups(ring_group, ring_rank, ring_size, dp_group, dp_rank, dp_size[, timeout])`` still
    describes a plain ring (U = 1, sp = the ring).
    """

    ring_group: dist.ProcessGroup | None
    ring_rank: int
    ring_size: int
    dp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int
    timeout: timedelta = DEFAULT_TIMEOUT
    ulysses_group: dist.ProcessGroup | None = None
    ulysses_rank: int = 0
    ulysses_size: int = 1
    sp_group: dist.ProcessGroup | None = _UNSET  # type: ignore[assignment]
    sp_rank: int = -1
    sp_size: int = -1

    def __post_init__(self):
        if self.sp_group is _UNSET:  # no Ulysses dimension given: the ring is the sp group
            object.__setattr__(self, "sp_group", self.ring_group if self.ulysses_size == 1 else None)
        if self.sp_size < 0:
            object.__setattr__(self, "sp_size", self.ring_size * self.ulysses_size)
        if self.sp_rank < 0:
            object.__setattr__(self, "sp_rank", self.ring_rank * self.ulysses_size + self.ulysses_rank)

    @property
    def world_size(self) -> int:
        """dp x sp (= dp x ulysses x ring): every rank of the job."""
        return self.sp_size * self.dp_size


def _check_size(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


def setup_groups(ring_size: int, *, ulysses_size: int = 1, timeout: timedelta | float | None = None) -> RingGroups:
    """Create the Ulysses, ring, sequence-parallel and data-parallel groups from the launcher's state.

    Under ``accelerate launch`` / ``torchrun`` the process group is initialised through
    accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA) if it is not already. A single
    process without a launcher gets ring_size 1. A collective: every rank calls it.

    Args:
        ring_size: C, processes per ring.
        ulysses_size: U, processes per Ulysses (all-to-all) group; consecutive ranks, so keep U
            within a node. U * C must divide the world size; U must divide the attention head count
            (checked at the first forward). 1: the plain ring.
        timeout: collective timeout of every group created here (and of the default group when
            this call initialises it): a timedelta or seconds; default ``$HF_RING_TIMEOUT`` or 10 min.

    Returns:
        RingGroups for this rank (rank layout in the module docstring).

    Raises:
        ValueError: a size < 1, or U * C does not divide the world size; a bad timeout.
    """
    _check_size("ring_size", ring_size)
    _check_size("ulysses_size", ulysses_size)
    sp = ring_size * ulysses_size
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
        if sp != 1:
            raise ValueError(f"ring_size={ring_size} x ulysses_size={ulysses_size} needs {sp} processes; launch "
                             f"with `accelerate launch --num_processes {sp} ...` or torchrun")
        return RingGroups(None, 0, 1, None, 0, 1, timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp != 0:
        what = f"ring_size={ring_size}" if ulysses_size == 1 else \
            f"ring_size={ring_size} x ulysses_size={ulysses_size} = {sp}"
        raise ValueError(f"{what} does not divide the world size {world}; choose a divisor of "
                         f"{world} or launch a multiple of {sp} processes")
    u, c = ulysses_size, ring_size
    dp, local = world // sp, rank % sp
    mine = {}

    def make(kind: str, ranks: list[int]) -> None:
        g = dist.new_group(ranks, timeout=timeout)  # every rank creates every group, in the same order
        if rank in ranks:
            mine[kind] = g

    for d in range(dp):
        base = d * sp
        for j in range(u):  # rings: stride U inside the sp group (U = 1: consecutive ranks, as before)
            make("ring", [base + j + i * u for i in range(c)])
        if u > 1:
            for i in range(c):  # Ulysses groups: U consecutive ranks
                make("ulysses", [base + i * u + j for j in range(u)])
            if c > 1:
                make("sp", list(range(base, base + sp)))
    if dp > 1:
        for j in range(sp):
            make("dp", list(range(j, world, sp)))
    sp_group = mine["ring"] if u == 1 else mine["ulysses"] if c == 1 else mine["sp"]
    return RingGroups(mine["ring"], local // u, c, mine.get("dp"), rank // sp, dp, timeout,
                      ulysses_group=mine.get("ulysses"), ulysses_rank=local % u, ulysses_size=u,
                      sp_group=sp_group, sp_rank=local, sp_size=sp)
