"""All-to-all sequence parallelism (DeepSpeed Ulysses) and its 2D hybrid with the ring.

A Ulysses group of U ranks holds U contiguous pieces of one ring shard (N / C tokens), every
piece with all heads. One all-to-all gives each rank the whole ring shard for Hq / U query heads
(and the kv heads those use); the ring then runs over the C ranks with the same Ulysses rank on
that head subset, exactly as it runs on all heads when U = 1; a second all-to-all brings the
output back to sequence pieces. (Jacobs et al. 2023, "DeepSpeed Ulysses"; the 2D hybrid as in
USP, Fang & Zhao 2024, and LoongTrain, Gu et al. 2024.)

Heads (``head_split``): rank u takes query heads [u * Hq / U, (u + 1) * Hq / U). GQA: kv head g
serves query heads g * G .. (g + 1) * G - 1 (G = Hq / Hkv); rank u takes the kv heads its query
heads use. When U > Hkv several ranks need the same kv head: it is sent to each of them
(replicated by U / Hkv, the smallest factor that keeps a uniform local group size), and in
backward the gradients of the copies are summed back (the gather's transpose).

Backward: an all-to-all with equal splits is its own transpose, so the backward of each exchange
is the same exchange applied to the gradient. Q, K and V travel in ONE all-to-all (and their
gradients in one); the output in one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .agreement import agree, dtype_code
from .comm import RingCommError
from .ring import RingOptions, make_config, run_ring


@dataclass(frozen=True)
class HeadSplit:
    """Which heads each Ulysses rank computes.

    Attributes:
        q_local: query heads per rank (Hq / U); rank u holds [u * q_local, (u + 1) * q_local).
        kv_heads: per rank, the global kv heads it holds, in local order (kv_local of them).
        replication: kv heads sent / Hkv (1: no kv head is sent twice).
    """

    q_local: int
    kv_heads: tuple[tuple[int, ...], ...]
    replication: float

    @property
    def kv_local(self) -> int:
        return len(self.kv_heads[0])


def head_split(num_heads: int, num_kv_heads: int, ulysses_size: int) -> HeadSplit:
    """Split Hq query heads and Hkv kv heads over U ranks (see the module docstring).

    The local kv count is the smallest divisor k of Hq / U for which every rank's query heads,
    cut into k equal groups, use one kv head per group (Hkv / U when U divides Hkv; 1 when Hkv
    divides U; Hq / U, one kv copy per query head, in the worst case).

    Raises:
        ValueError: U does not divide Hq, or Hkv does not divide Hq; names the fix.
    """
    hq, hkv, u = num_heads, num_kv_heads, ulysses_size
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if hq % u:
        divisors = [d for d in range(1, hq + 1) if hq % d == 0]
        raise ValueError(f"ulysses_size={u} does not divide the {hq} attention heads: each rank of a Ulysses "
                         f"group computes Hq / U heads. Choose ulysses_size in {divisors} (setup_groups("
                         "ring_size, ulysses_size=...)) and put the remaining processes in the ring")
    q_local, g = hq // u, hq // hkv
    for k in (d for d in range(1, q_local + 1) if q_local % d == 0):
        per = q_local // k  # local query heads per local kv head
        heads = tuple(tuple((r * q_local + j * per) // g for j in range(k)) for r in range(u))
        if all((r * q_local + i) // g == heads[r][i // per] for r in range(u) for i in range(q_local)):
            return HeadSplit(q_local, heads, k * u / hkv)
    raise AssertionError("unreachable: k = Hq / U always fits")  # pragma: no cover


@dataclass(frozen=True)
class UlyssesConfig:
    """The Ulysses group of one pass and how it exchanges."""

    group: dist.ProcessGroup | None
    size: int
    split: HeadSplit
    timeout: timedelta | None = None
    all_to_all: Callable | None = None  # fn(out, x, *, group, timeout): equal splits on dim 0


def _all_to_all(out: torch.Tensor, x: torch.Tensor, *, group, timeout: timedelta | None) -> None:
    work = dist.all_to_all_single(out, x, group=group, async_op=True)
    try:
        work.wait() if timeout is None else work.wait(timeout)
    except RuntimeError as e:
        raise RingCommError(f"Ulysses all-to-all over {dist.get_world_size(group)} ranks failed: a peer raised, "
                            f"stalled past the timeout or left. Look at the other ranks' errors. "
                            f"({type(e).__name__}: {str(e)[:300]})") from e


class _AllToAll(torch.autograd.Function):
    """x (U, ...) -> y (U, ...) with y[s] on rank r = x[r] on rank s; its own transpose."""

    @staticmethod
    def forward(ctx, x, cfg: UlyssesConfig):
        ctx.cfg = cfg
        return _exchange(x, cfg)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.cfg), None


def _exchange(x: torch.Tensor, cfg: UlyssesConfig) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    (cfg.all_to_all or _all_to_all)(out, x, group=cfg.group, timeout=cfg.timeout)
    return out


def seq_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: UlyssesConfig):
    """(B, H, S, D) sequence pieces -> (B, H / U, U * S, D) head shards of the whole ring shard.

    Returns q (B, q_local, U*S, D), k and v (B, kv_local, U*S, D); differentiable (one all-to-all
    each way).
    """
    b, hq, s, d = q.shape
    u, sp = cfg.size, cfg.split
    kv_idx = torch.tensor([h for heads in sp.kv_heads for h in heads], device=k.device)
    send = torch.cat([q.view(b, u, sp.q_local, s, d).transpose(0, 1),  # (U, B, q_local, S, D): to rank u
                      k.index_select(1, kv_idx).view(b, u, sp.kv_local, s, d).transpose(0, 1),
                      v.index_select(1, kv_idx).view(b, u, sp.kv_local, s, d).transpose(0, 1)], dim=2)
    recv = _AllToAll.apply(send, cfg)  # (U, B, q_local + 2 kv_local, S, D): piece of source rank s

    def heads(lo: int, hi: int) -> torch.Tensor:  # (B, hi - lo, U * S, D): pieces in sequence order
        return recv[:, :, lo:hi].permute(1, 2, 0, 3, 4).reshape(b, hi - lo, u * s, d)

    n_kv = sp.kv_local
    return heads(0, sp.q_local), heads(sp.q_local, sp.q_local + n_kv), heads(sp.q_local + n_kv, sp.q_local + 2 * n_kv)


def heads_to_seq(out: torch.Tensor, cfg: UlyssesConfig) -> torch.Tensor:
    """(B, q_local, U * S, D) -> (B, S, Hq, D): this rank's sequence piece with every head."""
    b, h, n, d = out.shape
    u, s = cfg.size, n // cfg.size
    send = out.view(b, h, u, s, d).permute(2, 0, 1, 3, 4)  # (U, B, q_local, S, D): piece u to rank u
    recv = _AllToAll.apply(send, cfg)  # (U, B, q_local, S, D): heads of rank u
    return recv.permute(1, 3, 0, 2, 4).reshape(b, s, u * h, d)


def run_hybrid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ucfg: UlyssesConfig,
               ring_config: Callable) -> torch.Tensor:
    """All-to-all to head shards, the ring on them, all-to-all back; differentiable.

    ``ring_config(q_h, k_h, v_h)`` builds the ring pass's ``RingConfig`` for the head shards
    (``ring.make_config``). Inputs already agreed (no validation collective).
    Returns (B, S_local, Hq, D).
    """
    qh, kh, vh = seq_to_heads(q, k, v, ucfg)
    out = run_ring(qh, kh, vh, ring_config(qh, kh, vh))
    return heads_to_seq(out, ucfg)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups, *, causal: bool = True,
                      scale: float | None = None, layout: str = "zigzag", sliding_window: int | None = None,
                      cu_seqlens=None, kernel: str | None = None, options: RingOptions | None = None,
                      tag: int = 0) -> torch.Tensor:
    """Exact attention of this sp rank's shard over Ulysses (all-to-all) x ring (``groups``).

    A collective over ``groups.sp_group``: the ranks first agree (one small all-gather over all
    U * C ranks, before any all-to-all) on shapes, dtype, layout, window, causal and document
    bounds, and that each passed its local checks (including the head split); otherwise every
    rank raises the same ``RingMismatchError``. With U = 1 this is ``ring_attention`` on the ring.

    Args:
        query: (B, Hq, S_local, D), this sp rank's shard: piece ``ulysses_rank`` of U of ring shard
            ``ring_rank`` in ``layout`` (``sharding.sp_shard_index`` gives its global indices).
        key, value: (B, Hkv, S_local, D).
        groups: a ``RingGroups`` (``setup_groups(ring_size, ulysses_size=U)``).
        causal, scale, layout, sliding_window, cu_seqlens, kernel, options, tag: as ``ring_attention``
            (``cu_seqlens``: global document bounds; ``options.timeout`` also bounds the all-to-alls).

    Returns:
        (B, Hq, S_local, D) in query's dtype, differentiable in query, key and value.

    Raises:
        RingMismatchError (a ValueError), on every rank: bad or disagreeing inputs, or heads that
            U does not divide.
        RingCommError / RingOutOfStepError: a peer failed or stalled in an exchange.
    """
    u, c = groups.ulysses_size, groups.ring_size
    opts = options or RingOptions()
    error, split, local = None, None, None
    try:
        _check_pieces(query, key, value)
        split = head_split(query.shape[1], key.shape[1], u)
        b, hq, s, d = query.shape
        # The ring's own checks, on the shapes the ring will see (zero-size placeholders).
        shaped = lambda h: query.new_empty(()).expand(b, h, s * u, d)  # noqa: E731
        local = make_config(shaped(split.q_local), shaped(split.kv_local), shaped(split.kv_local),
                            group=groups.ring_group, rank=groups.ring_rank, ring_size=c, causal=causal, scale=scale,
                            layout=layout, sliding_window=sliding_window, cu_seqlens=cu_seqlens, kernel=kernel,
                            options=options, tag=tag)
    except Exception as e:  # noqa: BLE001 - becomes this rank's verdict: every rank raises it together
        if groups.sp_size == 1:
            raise
        error = f"{type(e).__name__}: {e}"
    if groups.sp_size > 1:
        fields = {"shape (B, Hq, S_local, D)": tuple(query.shape), "key/value shape": tuple(key.shape),
                  "dtype": dtype_code(query.dtype), "layout": layout, "causal": int(bool(causal)),
                  "sliding_window": -1 if sliding_window is None else int(sliding_window),
                  "cu_seqlens": None if local is None else local.spec.cu_seqlens, "tag": int(tag),
                  "ulysses x ring": (u, c)}
        agree(fields, error, group=groups.sp_group, device=query.device, what="ulysses_attention")
    if u == 1:
        return run_ring(query, key, value, local)
    ucfg = UlyssesConfig(groups.ulysses_group, u, split, timeout=opts.timeout, all_to_all=opts.all_to_all)
    out = run_hybrid(query, key, value, ucfg, lambda qh, kh, vh: local)
    return out.transpose(1, 2)


def _check_pieces(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"query (B, Hq, S_local, D) and key/value (B, Hkv, S_local, D) must be 4-D, key and value "
                         f"alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} must agree in batch, local length and "
                         "head dim")
    if not (q.device == k.device == v.device) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key, value must share one device and dtype; got {q.device}/{q.dtype}, "
                         f"{k.device}/{k.dtype}, {v.device}/{v.dtype}")
