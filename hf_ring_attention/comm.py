"""Point-to-point ring communication (the ``comm`` layer).

``RingComm`` sends tensors to the next rank of a ring and receives the same-shaped
tensors from the previous rank. It works on every torch.distributed backend (gloo,
NCCL, ...): it only uses ``batch_isend_irecv`` and waits on every returned Work.
It knows nothing about attention.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist


class RingComm:
    """Double-buffered ring exchange with explicit neighbours.

    Args:
        group: the process group forming the ring (``None``: the default group).
        timeout: optional per-exchange wait timeout; ``None`` uses the group's.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, timeout: timedelta | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Group-local neighbours translated to global ranks: P2P ops take global ranks.
        g = group if group is not None else dist.group.WORLD
        self.send_to = dist.get_global_rank(g, (self.rank + 1) % self.world_size)
        self.recv_from = dist.get_global_rank(g, (self.rank - 1) % self.world_size)
        self.timeout = timeout
        self._works: list = []
        self._sending: list[torch.Tensor] = []  # keeps sent buffers alive until wait()

    def send_recv(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Start sending ``tensors`` to the next rank and receiving their twins.

        Returns the receive buffers; they are valid only after :meth:`wait`.
        The sent tensors must not be modified before :meth:`wait`.
        """
        if self._works:
            raise RuntimeError("RingComm.send_recv called twice without wait(); this is a bug")
        recv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        ops = []
        self._sending = [t.contiguous() for t in tensors]
        for t, r in zip(self._sending, recv):
            ops.append(dist.P2POp(dist.isend, t, self.send_to, self.group))
            ops.append(dist.P2POp(dist.irecv, r, self.recv_from, self.group))
        self._works = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        """Wait for every outstanding send and receive."""
        works, self._works = self._works, []
        for w in works:
            if self.timeout is None:
                w.wait()
            else:
                w.wait(self.timeout)
        # Release the sent buffers at once: the caller may have dropped its own reference.
        self._sending = []
