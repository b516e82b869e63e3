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

import numbers
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Callable

import torch
import torch.distributed as dist

from .agreement import agree, dtype_code
from .comm import RingComm
from .kernels import Kernel, merge_, select_kernel
from .plan import LAYOUTS, TILE_ROWS, MaskSpec, Task, step_tasks

# On CPU the backward runs every block in calls of at most this many query rows and key rows:
# each call allocates about two dq-sized buffers (its dq and a scratch) and its dK/dV, so these
# bound attention's working memory above the accumulators; per-call costs are small against the
# kernel's own tiling (256 x 512). On GPU whole blocks run at once: pieces there only re-read K/V
# and re-reduce dK/dV.
CPU_BWD_Q_ROWS = 1024
CPU_BWD_KV_ROWS = 2048

# Pass tags carried by every exchange (see comm.py): tag = 3 * pass id + direction.
FWD_KV, BWD_KV, BWD_DKV = 0, 1, 2


@dataclass(frozen=True, kw_only=True)
class RingOptions:
    """How the ring loops communicate and tile their work (the seam tests and benchmarks use).

    Attributes:
        comm: factory ``comm(group, *, timeout, tag)`` of an object with ``send_recv(tensors, *, step)``
            and ``wait()`` (default ``RingComm``: batched isend/irecv on the group).
        timeout: per-exchange wait; None: the group's own timeout (``setup_groups`` sets one).
        bwd_q_rows: query rows per backward kernel call; None: 1024 on CPU, whole blocks on GPU.
        bwd_kv_rows: key rows per backward kernel call (with ``bwd_q_rows``); None: 2048 on CPU, whole
            blocks on GPU.
        tile_rows: query rows per masked tile (bounds the explicit mask at tile_rows x S_k).
        split_bands: cut masked tiles into causal/full blocks and narrow strips; None: on GPUs only.
        all_to_all: the Ulysses exchange ``fn(out, x, *, group, timeout)`` (equal splits along dim 0);
            None: ``torch.distributed.all_to_all_single`` (see ``ulysses.py``).
    """

    comm: Callable[..., object] = RingComm
    timeout: timedelta | None = None
    bwd_q_rows: int | None = None
    bwd_kv_rows: int | None = None
    tile_rows: int = TILE_ROWS
    split_bands: bool | None = None
    all_to_all: Callable[..., None] | None = None


DEFAULT_OPTIONS = RingOptions()


@dataclass(frozen=True, kw_only=True)
class RingConfig:
    """Everything one ring pass needs besides the tensors."""

    group: dist.ProcessGroup | None
    rank: int
    ring_size: int
    layout: str
    spec: MaskSpec
    scale: float
    kernel: Kernel
    tag: int = 0  # pass id (e.g. the layer index); exchanges carry 3 * tag + direction
    options: RingOptions = field(default=DEFAULT_OPTIONS)

    def comm(self, direction: int):
        return self.options.comm(self.group, timeout=self.options.timeout, tag=3 * self.tag + direction)


@lru_cache(maxsize=64)
def _tasks(spec: MaskSpec, layout: str, rank: int, source: int, ring_size: int, local_len: int,
           split_bands: bool, tile_rows: int) -> tuple[Task, ...]:
    # Plans depend only on these; layers of a model reuse them.
    return tuple(step_tasks(spec, layout, rank, source, ring_size, local_len, tile_rows, split_bands))


def _plan(cfg: RingConfig, step: int, q: torch.Tensor) -> tuple[Task, ...]:
    """This rank's block tasks at ``step`` (against the shard of rank - step); bands are split on GPUs."""
    c, opts = cfg.ring_size, cfg.options
    split = q.device.type != "cpu" if opts.split_bands is None else opts.split_bands
    return _tasks(cfg.spec, cfg.layout, cfg.rank, (cfg.rank - step) % c, c, q.shape[2], split, opts.tile_rows)


def _rows(t: torch.Tensor, sl: slice) -> torch.Tensor:
    return t[:, :, sl]  # (B, H, S, ...) -> rows sl of the sequence dim


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: RingConfig):
    """Returns out (B, Hq, S, D) in q's dtype and lse (B, Hq, S) in fp32 (fp64 for fp64)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    c = cfg.ring_size
    comm = cfg.comm(FWD_KV) if c > 1 else None
    for step in range(c):
        if step + 1 < c:
            nxt = comm.send_recv([k, v], step=step)  # overlap: next shard travels while we compute
        for t in _plan(cfg, step, q):
            bo, bl = cfg.kernel.forward(_rows(q, t.q), _rows(k, t.k), _rows(v, t.k), scale=cfg.scale,
                                        causal=t.kind == "causal", mask=t.mask(q.device))
            merge_(_rows(out, t.q), _rows(lse, t.q), bo, bl)
        if step + 1 < c:
            comm.wait()
            k, v = nxt
    return out.to(q.dtype), lse


def _pieces(t: Task, mask: torch.Tensor | None, q_rows: int | None, kv_rows: int | None) -> list[tuple]:
    """The backward kernel calls of task ``t``: (query rows, key rows, causal, mask), each within
    ``q_rows`` x ``kv_rows`` (None: the whole task in one call).

    A causal (diagonal) block's piece of rows [o, o + q_rows) sees the keys before o in full and its
    own square causally (the kernel's causal mask is top-left aligned). Masked tiles take the
    matching columns of their mask; a piece whose mask allows nothing is dropped.
    """
    if q_rows is None and kv_rows is None:
        return [(t.q, t.k, t.kind == "causal", mask)]
    q_rows, kv_rows = q_rows or (t.q.stop - t.q.start), kv_rows or (t.k.stop - t.k.start)
    calls = []
    for a in range(t.q.start, t.q.stop, q_rows):
        qs = slice(a, min(a + q_rows, t.q.stop))
        if t.kind == "causal":
            off = t.k.start + a - t.q.start
            calls += _key_pieces(qs, slice(t.k.start, off), None, kv_rows)
            calls.append((qs, slice(off, off + qs.stop - qs.start), True, None))
        else:
            m = None if mask is None else mask[a - t.q.start:qs.stop - t.q.start]
            calls += _key_pieces(qs, t.k, m, kv_rows)
    return calls


def _key_pieces(qs: slice, ks: slice, mask: torch.Tensor | None, kv_rows: int) -> list[tuple]:
    calls = []
    for b in range(ks.start, ks.stop, kv_rows):
        e = min(b + kv_rows, ks.stop)
        m = None if mask is None else mask[:, b - ks.start:e - ks.start]
        if m is None or bool(m.any()):
            calls.append((qs, slice(b, e), False, m))
    return calls


def ring_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """Returns dq, dk, dv in the inputs' dtypes, dk/dv with the kv-head count of k/v."""
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows with no key: p = exp(s - inf) = 0
    c = cfg.ring_size
    kv_comm = cfg.comm(BWD_KV) if c > 1 else None
    dkv_comm = cfg.comm(BWD_DKV) if c > 1 else None
    k_dtype, v_dtype = k.dtype, v.dtype
    cpu = q.device.type == "cpu"
    q_rows = cfg.options.bwd_q_rows or (CPU_BWD_Q_ROWS if cpu else None)
    kv_rows = cfg.options.bwd_kv_rows or (CPU_BWD_KV_ROWS if cpu else None)
    for step in range(c):
        if step + 1 < c:
            nxt = kv_comm.send_recv([k, v], step=step)
        if step > 0:
            dkv_comm.wait()  # the accumulators of the shard we now hold, from rank r-1
            dk, dv = dkv_recv
        for t in _plan(cfg, step, q):
            for qs, ks, causal, mask in _pieces(t, t.mask(q.device), q_rows, kv_rows):
                bdq, bdk, bdv = cfg.kernel.backward(
                    _rows(dout, qs), _rows(q, qs), _rows(k, ks), _rows(v, ks), _rows(out, qs), _rows(lse, qs),
                    scale=cfg.scale, causal=causal, mask=mask)
                _rows(dq, qs).add_(bdq)
                _rows(dk, ks).add_(bdk)
                _rows(dv, ks).add_(bdv)
                del bdq, bdk, bdv
        if c > 1:
            dkv_recv = dkv_comm.send_recv([dk, dv], step=step)  # on to r+1, who holds this shard next
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
                   cu_seqlens: torch.Tensor | list[int] | None = None, kernel: str | None = None,
                   options: RingOptions | None = None, tag: int = 0) -> torch.Tensor:
    """Exact attention of this rank's query shard against the whole sharded sequence.

    A collective over ``group``: before any ring communication the ranks agree (one small
    all-gather) that they hold shards of the same kind (shapes, dtype, layout, window, causal,
    document bounds) and that each passed its local checks; otherwise every rank raises the
    same ``RingMismatchError``.

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
        options: communication and tiling (``RingOptions``; default: ``RingComm``, the group's timeout).
        tag: an int naming this pass (e.g. the layer index): every exchange checks it against the peer's.

    Returns:
        (B, Hq, S_local, D) in query's dtype, differentiable in query, key and value.

    Raises:
        RingMismatchError (a ValueError), on every rank: inconsistent shapes, dtypes or devices, a
            layout or kernel that does not exist, a zigzag shard of odd length, bad cu_seqlens, or
            ranks that disagree on any of these.
        RingCommError / RingOutOfStepError: a peer failed, stalled or is out of step during the ring.
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        rank, ring = 0, 1
    else:
        rank, ring = dist.get_rank(group), dist.get_world_size(group)
    error, cfg = None, None
    try:
        cfg = make_config(query, key, value, group=group, rank=rank, ring_size=ring, causal=causal, scale=scale,
                          layout=layout, sliding_window=sliding_window, cu_seqlens=cu_seqlens, kernel=kernel,
                          options=options, tag=tag)
    except Exception as e:  # noqa: BLE001 - becomes this rank's verdict: every rank raises it together
        if ring == 1:
            raise
        error = f"{type(e).__name__}: {e}"
    if ring > 1:
        fields = {"shape (B, Hq, S_local, D)": tuple(query.shape), "key/value shape": tuple(key.shape),
                  "dtype": dtype_code(query.dtype), "layout": layout, "causal": int(bool(causal)),
                  "sliding_window": -1 if sliding_window is None else int(sliding_window),
                  "cu_seqlens": None if cfg is None else cfg.spec.cu_seqlens, "tag": int(tag)}
        agree(fields, error, group=group, device=query.device, what="ring_attention")
    return _RingAttention.apply(query, key, value, cfg)


def make_config(query, key, value, *, group, rank: int, ring_size: int, causal: bool, scale: float | None,
                layout: str, sliding_window: int | None, cu_seqlens, kernel: str | None,
                options: RingOptions | None, tag: int) -> RingConfig:
    """Validate this rank's arguments (no communication) and build the pass's ``RingConfig``.

    Raises:
        ValueError: anything ``ring_attention`` refuses, naming the value and the fix.
    """
    _check_local(query, key, value, layout, causal, sliding_window)
    b, hq, s_local, d = query.shape
    cu = _check_cu_seqlens(cu_seqlens, s_local * ring_size)
    if layout == "zigzag_docs":
        bad = [b - a for a, b in zip(cu or (), (cu or ())[1:]) if (b - a) % (2 * ring_size)]
        if cu is None or bad:
            raise ValueError(f"layout='zigzag_docs' needs cu_seqlens whose document lengths are multiples of "
                             f"2 * ring size = {2 * ring_size}; got cu_seqlens={cu}. Pad each document "
                             "(shard_batch does this)")
    spec = MaskSpec(causal=causal, window=None if sliding_window is None else int(sliding_window), cu_seqlens=cu)
    return RingConfig(group=group, rank=rank, ring_size=ring_size, layout=layout, spec=spec,
                      scale=d ** -0.5 if scale is None else float(scale), kernel=select_kernel(query, kernel),
                      tag=tag, options=DEFAULT_OPTIONS if options is None else options)


def run_ring(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cfg: RingConfig) -> torch.Tensor:
    """The ring pass of ``cfg`` on already-agreed inputs (no validation collective); differentiable."""
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


def _check_cu_seqlens(cu, total: int) -> tuple[int, ...] | None:
    if cu is None:
        return None
    if torch.is_tensor(cu):
        if cu.dim() != 1 or cu.is_floating_point() or cu.is_complex():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor or a list of ints; got a {cu.dim()}-D "
                             f"{cu.dtype} tensor of shape {tuple(cu.shape)}. Pass one row's boundaries, e.g. "
                             "torch.tensor([0, 100, 256])")
        cu = cu.tolist()
    vals = tuple(cu)
    if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in vals):
        raise ValueError(f"cu_seqlens must hold ints (document boundaries); got {vals!r}")
    vals = tuple(int(x) for x in vals)
    if len(vals) < 2 or vals[0] != 0 or vals[-1] != total or any(b <= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"cu_seqlens must increase strictly from 0 to the global length {total}; got {vals}")
    return vals
