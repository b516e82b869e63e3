"""Point-to-point ring communication (the ``comm`` layer).

``RingComm`` sends tensors to the next rank of a ring and receives the same-shaped
tensors from the previous rank. It works on every torch.distributed backend (gloo,
NCCL, ...): it only uses ``batch_isend_irecv`` and waits on every returned Work.
It knows nothing about attention.

Every exchange also carries a two-int header ``(tag, step)``: the caller's pass tag (e.g. the
layer index and direction) and the ring step. A peer that is out of step (it skipped a layer,
or runs another pass) sends a different header: the receiver raises ``RingOutOfStepError``
instead of computing on the wrong K/V. A peer that stalls or died surfaces as
``RingCommError`` naming the step and the peer, after the group's timeout (or ``timeout``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist


class RingCommError(RuntimeError):
    """A ring exchange did not complete: a peer failed, stalled past the timeout, or left."""


class RingOutOfStepError(RuntimeError):
    """A ring exchange delivered a block from a different pass or step: the ranks are out of step."""


class RingComm:
    """Double-buffered ring exchange with explicit neighbours.

    Args:
        group: the process group forming the ring (``None``: the default group).
        timeout: per-exchange wait timeout; ``None`` uses the group's (set by ``setup_groups``).
        tag: an int naming this pass (checked against the peer's at every step; see module doc).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, timeout: timedelta | None = None, tag: int = 0):
        self.group = group
        self.rank = dist.get_rank(group)
        self.ring_size = dist.get_world_size(group)
        # Group-local neighbours translated to global ranks: P2P ops take global ranks.
        g = group if group is not None else dist.group.WORLD
        self.send_to = dist.get_global_rank(g, (self.rank + 1) % self.ring_size)
        self.recv_from = dist.get_global_rank(g, (self.rank - 1) % self.ring_size)
        self.timeout = timeout
        self.tag = int(tag)
        self._works: list = []
        self._sending: list[torch.Tensor] = []  # keeps sent buffers alive until wait()
        self._header: torch.Tensor | None = None
        self._step = 0

    def send_recv(self, tensors: Sequence[torch.Tensor], *, step: int = 0) -> list[torch.Tensor]:
        """Start sending ``tensors`` to the next rank and receiving their twins (ring step ``step``).

        Returns the receive buffers; they are valid only after :meth:`wait`.
        The sent tensors must not be modified before :meth:`wait`.
        """
        if self._works:
            raise RuntimeError("RingComm.send_recv called twice without wait(); this is a bug")
        device = tensors[0].device
        mine = torch.tensor([self.tag, step], dtype=torch.int64, device=device)
        self._header = torch.empty_like(mine)
        recv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        self._sending = [mine] + [t.contiguous() for t in tensors]
        ops = []
        for t, r in zip(self._sending, [self._header] + recv):
            ops.append(dist.P2POp(dist.isend, t, self.send_to, self.group))
            ops.append(dist.P2POp(dist.irecv, r, self.recv_from, self.group))
        self._step = step
        self._works = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        """Wait for every outstanding send and receive, then check the peer's header.

        Raises:
            RingCommError: the exchange failed or timed out (names the step and the peers).
            RingOutOfStepError: the previous rank sent a block of another pass or step.
        """
        works, self._works = self._works, []
        try:
            for w in works:
                if self.timeout is None:
                    w.wait()
                else:
                    w.wait(self.timeout)
        except RuntimeError as e:
            raise RingCommError(
                f"ring exchange at step {self._step} (pass tag {self.tag}) failed: rank {self.rank} of the ring "
                f"receives from global rank {self.recv_from} and sends to global rank {self.send_to}; a peer "
                f"raised, stalled past the timeout or left the ring. Look at the other ranks' errors. "
                f"({type(e).__name__}: {str(e)[:300]})") from e
        finally:
            # Release the sent buffers at once: the caller may have dropped its own reference.
            self._sending = []
        if self._header.device.type == "cpu":  # on GPUs the check would stall the stream every step
            got = self._header.tolist()
            if got != [self.tag, self._step]:
                raise RingOutOfStepError(
                    f"ring step {self._step} of pass tag {self.tag}: global rank {self.recv_from} sent the block of "
                    f"pass tag {got[0]}, step {got[1]}; the ranks are out of step (one skipped a layer or a "
                    "forward, or runs a different model)")
