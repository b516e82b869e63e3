"""Run the ring's forward/backward loops for C ranks as C threads of one process.

For a single device (one GPU) where C real processes cannot each own a device: the same
``ring_forward`` / ``ring_backward`` code runs for every rank, with ``RingComm`` replaced
by an in-process exchange passed as ``RingOptions(comm=...)`` (a clone of each sent tensor, delivered to the next rank's
receive buffer on ``wait``). Only the transport differs from a real ring; the plans,
block kernels, merges and the travelling dK/dV accumulators are the real ones.
Autograd is not used: ``ring_backward`` is called directly (a thread blocked in one rank's
backward would otherwise hold the device's autograd worker that the other ranks need).
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict

import torch

from hf_ring_attention import ring as ring_mod
from hf_ring_attention.kernels import select_kernel
from hf_ring_attention.plan import TILE_ROWS, MaskSpec


class _Rank:
    """Stands in for a process group in ``RingConfig.group``: one rank of a virtual ring."""

    def __init__(self, rank, world, boxes, lock):
        self.rank, self.world, self.boxes, self.lock = rank, world, boxes, lock
        self.created = 0  # comms created so far by this rank: every rank creates them in the same order


class _ThreadComm:
    """A ``RingOptions.comm``: the exchange of one pass between the threads of a virtual ring."""

    def __init__(self, group: _Rank, **_):
        self.g, self.channel = group, group.created
        group.created += 1
        self.pending = None

    def _box(self, rank):
        with self.g.lock:
            return self.g.boxes[(self.channel, rank)]

    def send_recv(self, tensors, *, step=0):
        if self.pending is not None:
            raise RuntimeError("send_recv called twice without wait()")
        self._box((self.g.rank + 1) % self.g.world).put([t.detach().clone() for t in tensors])
        self.pending = [torch.empty_like(t) for t in tensors]
        return self.pending

    def wait(self):
        got = self._box(self.g.rank).get(timeout=120)
        for buf, t in zip(self.pending, got):
            buf.copy_(t)
        self.pending = None


def run_virtual_ring(q_shards, k_shards, v_shards, dout_shards, *, layout="zigzag", causal=True, window=None,
                     cu_seqlens=None, kernel=None, scale=None, split_bands=None, tile_rows=None):
    """Per-rank (out, dq, dk, dv) of the ring over the given shards (one list entry per rank).
    ``split_bands`` / ``tile_rows``: force the planner's choices (default: the ring's)."""
    world = len(q_shards)
    boxes, lock = defaultdict(queue.Queue), threading.Lock()
    spec = MaskSpec(causal=causal, window=window, cu_seqlens=None if cu_seqlens is None else tuple(cu_seqlens))
    d = q_shards[0].shape[-1]
    results, errors = [None] * world, []

    opts = ring_mod.RingOptions(comm=_ThreadComm, split_bands=split_bands,
                                tile_rows=TILE_ROWS if tile_rows is None else tile_rows)

    def rank_fn(r):
        try:
            q, k, v, do = q_shards[r], k_shards[r], v_shards[r], dout_shards[r]
            cfg = ring_mod.RingConfig(group=_Rank(r, world, boxes, lock), rank=r, ring_size=world, layout=layout,
                                      spec=spec, scale=d ** -0.5 if scale is None else scale,
                                      kernel=select_kernel(q, kernel), options=opts)
            out, lse = ring_mod.ring_forward(q, k, v, cfg)
            dq, dk, dv = ring_mod.ring_backward(do, q, k, v, out, lse, cfg)
            results[r] = (out, dq, dk, dv)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append((r, e))

    threads = [threading.Thread(target=rank_fn, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0][1]
    if any(t.is_alive() for t in threads):
        raise TimeoutError("virtual ring did not finish")
    return results
