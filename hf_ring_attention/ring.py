"""The ring loops (forward, backward), the thin autograd Function and ``ring_attention``.

Forward at ring rank r, step s = 0..C-1: hold the K/V shard of source j = (r - s) mod C,
start sending it on to r+1 (receiving j-1's from r-1) before computing on it, run the
step's block tasks (``plan.step_tasks``) and merge each block's (out, lse) into fp32
accumulators. Backward: dQ accumulates locally in fp32; dK/dV accumulators (fp32) travel
with their K/V shard and arrive home after the last hop. No rank ever holds more than
two K/V shards and two dK/dV accumulators: memory per rank is O(N / C).
(Liu et al. 2023, "Ring Attention with Blockwise Transformers"; zigzag balancing as in
ring-flash-attention.)
"""

from __future__ import annotations

import operator
import reprlib
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from .comm import RingComm
from .kernels import Kernel, merge_, select_kernel
from . import plan as plan_mod
from .plan import LAYOUTS, MaskSpec, Task, step_tasks

# On CPU, full blocks run their backward in pieces of this many query rows: it bounds the
# kernel's per-call buffers (interleaved runs measured 2048 and 4096 at the same CPU time).
# On GPU whole blocks run at once: pieces there only re-read K/V and re-reduce dK/dV.
BWD_Q_ROWS = 4096


@dataclass(frozen=True)
class RingConfig:
    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    layout: str
    spec: MaskSpec
    scale: float
    kernel: Kernel


@lru_cache(maxsize=64)
def _tasks(spec: MaskSpec, layout: str, rank: int, source: int, world_size: int, local_len: int,
           split_bands: bool, tile_rows: int) -> tuple[Task, ...]:
    # Plans depend only on these; layers of a model reuse them.
    return tuple(step_tasks(spec, layout, rank, source, world_size, local_len, tile_rows, split_bands))


def _plan(cfg: RingConfig, step: int, q: torch.Tensor) -> tuple[Task, ...]:
    """This rank's block tasks at ``step`` (against the shard of rank - step); bands are split on GPUs."""
    c = cfg.world_size
    return _tasks(cfg.spec, cfg.layout, cfg.rank, (cfg.rank - step) % c, c, q.shape[2], q.device.type != "cpu",
                  plan_mod.TILE_ROWS)


def _rows(t: torch.Tensor, sl: slice) -> torch.Tensor:
    return t[:, :, sl]  # (B, H, S, ...) -> rows sl of the sequence dim


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: RingConfig):
    """Returns out (B, Hq, S, D) in q's dtype and lse (B, Hq, S) in fp32 (fp64 for fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    comm = RingComm(cfg.group) if cfg.world_size > 1 else None
    c = cfg.world_size
    for step in range(c):
        if step + 1 < c:
            nxt = comm.send_recv([k, v])  # overlap: next shard travels while we compute
        for t in _plan(cfg, step, q):
            bo, bl = cfg.kernel.forward(_rows(q, t.q), _rows(k, t.k), _rows(v, t.k), scale=cfg.scale,
                                        causal=t.kind == "causal", mask=t.mask(q.device))
            merge_(_rows(out, t.q), _rows(lse, t.q), bo, bl)
        if step + 1 < c:
            comm.wait()
            k, v = nxt
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """Returns dq, dk, dv in the inputs' dtypes, dk/dv with the kv-head count of k/v."""
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows with no key: p = exp(s - inf) = 0
    kv_comm = RingComm(cfg.group) if cfg.world_size > 1 else None
    dkv_comm = RingComm(cfg.group) if cfg.world_size > 1 else None
    c = cfg.world_size
    k_dtype, v_dtype = k.dtype, v.dtype
    piece_rows = BWD_Q_ROWS if q.device.type == "cpu" else None
    for step in range(c):
        if step + 1 < c:
            nxt = kv_comm.send_recv([k, v])
        if step > 0:
            dkv_comm.wait()  # the accumulators of the shard we now hold, from rank r-1
            dk, dv = dkv_recv
        for t in _plan(cfg, step, q):
            kb, vb, mask = _rows(k, t.k), _rows(v, t.k), t.mask(q.device)
            pieces = [t.q] if t.kind != "full" or piece_rows is None else [
                slice(a, min(a + piece_rows, t.q.stop)) for a in range(t.q.start, t.q.stop, piece_rows)]
            for qs in pieces:
                bdq, bdk, bdv = cfg.kernel.backward(
                    _rows(dout, qs), _rows(q, qs), kb, vb, _rows(out, qs), _rows(lse, qs),
                    scale=cfg.scale, causal=t.kind == "causal", mask=mask)
                _rows(dq, qs).add_(bdq)
                _rows(dk, t.k).add_(bdk)
                _rows(dv, t.k).add_(bdv)
                del bdq, bdk, bdv
        if c > 1:
            dkv_recv = dkv_comm.send_recv([dk, dv])  # on to r+1, who holds this shard next
            del dk, dv
        if step + 1 < c:
            kv_comm.wait()
            k, v = nxt
    if c > 1:
        dkv_comm.wait()  # after C hops our own shard's accumulators are home
        dk, dv = dkv_recv
    return dq.to(q.dtype), dk.to(k_dtype), dv.to(v_dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: RingConfig):
        out, lse = ring_forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.cfg)
        return dq, dk, dv, None


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   group: dist.ProcessGroup | None = None, causal: bool = True, scale: float | None = None,
                   layout: str = "zigzag", sliding_window: int | None = None,
                   cu_seqlens: torch.Tensor | list[int] | None = None, kernel: str | None = None) -> torch.Tensor:
    """Exact attention of this rank's query shard against the whole sharded sequence.

    Args:
        query: (B, Hq, S_local, D), this rank's shard in ``layout``.
        key, value: (B, Hkv, S_local, D), Hq % Hkv == 0; sent around the ring with Hkv heads.
        group: the ring's ProcessGroup (default: the world group; no process group: ring size 1).
        causal: causal attention over global positions.
        scale: softmax scale (default 1/sqrt(D)).
        layout: "zigzag" (load-balanced causal), "contiguous", or "zigzag_docs" (zigzag
            within every document of ``cu_seqlens``: balanced for any mix of document lengths).
        sliding_window: keep keys with q_idx - kv_idx < sliding_window (causal only).
        cu_seqlens: global document boundaries (0, ..., N) of packed sequences (same for the
            whole batch): queries attend only within their document.
        kernel: block kernel name ("auto", "cpu_flash", "cuda_cudnn", "cuda_flash", "cuda_efficient",
            "flash_attn", "math").

    Returns:
        (B, Hq, S_local, D) in query's dtype, differentiable in query, key and value.

    Raises:
        ValueError: inconsistent shapes, dtypes or devices, a layout or kernel that does not
            exist, a zigzag shard of odd length, local lengths that differ across ranks.
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        rank, world = 0, 1
    else:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    _check_local(query, key, value, layout, causal, sliding_window)
    _check_across_ranks(query, key, group, world)
    b, hq, s_local, d = query.shape
    cu = _check_cu_seqlens(cu_seqlens, s_local * world)
    if layout == "zigzag_docs":
        bad = [b - a for a, b in zip(cu or (), (cu or ())[1:]) if (b - a) % (2 * world)]
        if cu is None or bad:
            raise ValueError(f"layout='zigzag_docs' needs cu_seqlens whose document lengths are multiples of "
                             f"2 * ring size = {2 * world}; got cu_seqlens={cu}. Pad each document "
                             "(shard_batch does this)")
    spec = MaskSpec(causal=causal, window=None if sliding_window is None else int(sliding_window), cu_seqlens=cu)
    cfg = RingConfig(group, rank, world, layout, spec, d ** -0.5 if scale is None else float(scale),
                     select_kernel(query, kernel))
    return _RingAttention.apply(query, key, value, cfg)


def _check_local(q, k, v, layout, causal, sliding_window) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not known; choose one of {LAYOUTS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"query/key/value must be 4-D (B, H, S_local, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} must agree in batch, "
                         "local length and head dim (ring attention shards q, k, v the same way)")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key, value are on different devices ({q.device}, {k.device}, {v.device}); "
                         "move them to one device")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key, value have different dtypes ({q.dtype}, {k.dtype}, {v.dtype}); cast them")
    if layout != "contiguous" and q.shape[2] % 2 != 0:
        raise ValueError(f"a zigzag shard holds two equal chunks, so its length must be even; got "
                         f"{q.shape[2]}. Pad the full sequence to a multiple of 2 * ring_size")
    if sliding_window is not None and (not causal or int(sliding_window) < 1):
        raise ValueError(f"sliding_window={sliding_window} needs causal=True and a value >= 1")


def _check_across_ranks(q, k, group, world) -> None:
    """All ranks must hold shards of one sequence: same shapes everywhere (one tiny all_gather)."""
    if world == 1:
        return
    mine = torch.tensor([*q.shape, k.shape[1]], dtype=torch.int64, device=q.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    shapes = [tuple(t.tolist()) for t in every]
    if len(set(shapes)) != 1:
        raise ValueError("ranks of the ring hold shards of different shapes (B, Hq, S_local, D, Hkv): "
                         f"{shapes}; shard one sequence with zigzag_shard / shard_batch on every rank")


def _check_cu_seqlens(cu, total: int) -> tuple[int, ...] | None:
    if cu is None:
        return None
    fix = "pass a 1-D int64 tensor or a list of ints (one set of boundaries for the whole batch)"
    if torch.is_tensor(cu):
        if cu.dim() != 1 or cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be 1-D integers; got a tensor of dtype {cu.dtype} and shape "
                             f"{tuple(cu.shape)}: {fix}")
        cu = cu.tolist()
    vals = []
    for x in cu:
        try:  # operator.index refuses floats, which int() would truncate silently (1.7 -> 1)
            if isinstance(x, bool):
                raise TypeError
            vals.append(operator.index(x))
        except TypeError:
            raise ValueError(f"cu_seqlens must hold integers; got {reprlib.repr(x)} of type {type(x).__name__}: "
                             f"{fix}") from None
    vals = tuple(vals)
    if len(vals) < 2 or vals[0] != 0 or vals[-1] != total or any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"cu_seqlens must increase strictly from 0 to the global length {total}; got {vals}")
    return vals
