"""Process groups for sequence parallelism (rings) x data parallelism.

World = dp x ring. Rings are blocks of consecutive ranks (ranks 0..C-1 form ring 0, so a
ring stays inside a node when C divides the GPUs per node); the data-parallel group of a
rank holds the ranks with the same position in every ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


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
    """

    ring_group: dist.ProcessGroup | None
    ring_rank: int
    ring_size: int
    dp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int

    @property
    def world_size(self) -> int:
        return self.ring_size * self.dp_size


def setup_groups(ring_size: int) -> RingGroups:
    """Create the ring and data-parallel groups from the launcher's state.

    Under ``accelerate launch`` / ``torchrun`` the process group is initialised through
    accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA) if it is not already. A single
    process without a launcher gets ring_size 1.

    Args:
        ring_size: processes per ring; must divide the world size.

    Returns:
        RingGroups for this rank.

    Raises:
        ValueError: ring_size < 1 or it does not divide the world size.
    """
    if not isinstance(ring_size, int) or ring_size < 1:
        raise ValueError(f"ring_size={ring_size!r} must be a positive int")
    if not dist.is_initialized():
        import torch
        from accelerate import PartialState

        # Initialises torch.distributed when launched with several processes; on CPU-only
        # machines accelerate must be told cpu=True or it reports a single process.
        PartialState(cpu=not torch.cuda.is_available())
    if not dist.is_initialized():
        if ring_size != 1:
            raise ValueError(f"ring_size={ring_size} needs {ring_size} processes; launch with "
                             f"`accelerate launch --num_processes {ring_size} ...` or torchrun")
        return RingGroups(None, 0, 1, None, 0, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ring_size != 0:
        raise ValueError(f"ring_size={ring_size} does not divide the world size {world}; choose a divisor of "
                         f"{world} or launch a multiple of {ring_size} processes")
    dp = world // ring_size
    ring_group = dp_group = None
    # Every rank must create every group, in the same order.
    for d in range(dp):
        g = dist.new_group(list(range(d * ring_size, (d + 1) * ring_size)))
        if rank // ring_size == d:
            ring_group = g
    if dp > 1:
        for c in range(ring_size):
            g = dist.new_group(list(range(c, world, ring_size)))
            if rank % ring_size == c:
                dp_group = g
    return RingGroups(ring_group, rank % ring_size, ring_size, dp_group, rank // ring_size, dp)
