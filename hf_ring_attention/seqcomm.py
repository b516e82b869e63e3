"""Sequence-order exchanges over the sequence-parallel group, for token mixers (no model code here).

A token mixer (recurrence, convolution) needs its tokens in sequence order, while each rank of
the sp group holds a shard in some layout (zigzag, per-document zigzag, ...). Everything here is
written against one fact: the global index of every local token of every sp rank
(``SeqLayout.index``, from ``sharding.sp_shard_index``), so it holds for any layout that function
describes, Ulysses x ring splits included. All functions are differentiable; the collectives are one ``all_gather`` or one
``all_to_all_single`` per call, and each backward is the transpose (an all-to-all back).

- ``gather_sequence``: every rank gets the whole sequence (B, N, F) in order; backward sums the
  gradients of every rank's copy onto the owner of each token.
- ``to_heads`` / ``to_tokens``: an all-to-all from (this rank's tokens, all features) to (all
  tokens in order, this rank's features) and back (head / channel parallelism).
- ``fetch_tokens``: the few tokens at given global indices, wherever they live (a convolution's halo).

Every rank must call these with the same shapes (the patched model's forward hook agrees on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from .sharding import sp_shard_index


@dataclass(frozen=True)
class SeqLayout:
    """Where the tokens of one forward live.

    Attributes:
        group: the sequence-parallel process group.
        rank, size: this rank's position in it, and its size.
        index: (size, B, S_local) long, the global index of every sp rank's local tokens, per row.
        inverse: (B, N) long, for each global index its position in ``index[:, b].reshape(-1)``
            (rank-major: rank r's token s is at r * S_local + s).
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int
    index: torch.Tensor
    inverse: torch.Tensor

    @property
    def mine(self) -> torch.Tensor:
        """(B, S_local): the global indices of this rank's tokens."""
        return self.index[self.rank]


@lru_cache(maxsize=64)
def _rank_indices(layout: str, size: int, local_len: int, cu_seqlens: tuple[int, ...] | None,
                  ulysses_size: int) -> torch.Tensor:
    # The only place that knows how ranks hold tokens: sp rank -> global indices, with U Ulysses
    # pieces per ring shard (what shard_batch gives each rank).
    return torch.stack([sp_shard_index(layout, r, size, local_len, cu_seqlens, ulysses_size=ulysses_size)
                        for r in range(size)])  # (size, S)


def seq_layout(layout: str, documents, *, group, rank: int, size: int, batch: int, local_len: int,
               device: torch.device, ulysses_size: int = 1) -> SeqLayout:
    """The ``SeqLayout`` of a forward (no communication).

    Args:
        layout: the shard layout ("zigzag", "zigzag_docs", "contiguous").
        documents: per batch row, the global document bounds (0, ..., N) or None (the
            ``ring_context.documents`` of the patched model's forward).
        group, rank, size: the sequence-parallel group (U * C ranks) and this rank's place in it
            (``RingGroups.sp_rank``).
        batch, local_len: B and S_local of this rank's tokens.
        device: where the index tensors go.
        ulysses_size: U, the Ulysses pieces per ring shard (``RingGroups.ulysses_size``).

    Returns:
        The ``SeqLayout``.

    Raises:
        ValueError: ``ulysses_size`` does not divide ``size``.
    """
    rows = []
    for b in range(batch):
        docs = documents[b] if documents is not None and b < len(documents) else None
        cu = tuple(int(x) for x in docs) if layout == "zigzag_docs" and docs is not None else None
        rows.append(_rank_indices(layout, size, local_len, cu, ulysses_size))
    index = torch.stack(rows, dim=1)  # (size, B, S)
    flat = index.permute(1, 0, 2).reshape(batch, size * local_len)  # (B, N): global index of each gathered slot
    inverse = torch.empty_like(flat).scatter_(1, flat, torch.arange(size * local_len).expand(batch, -1))
    return SeqLayout(group, rank, size, index.to(device), inverse.to(device))


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` per batch row: x (B, M, F), idx (B, K) -> (B, K, F) (differentiable; no expanded index)."""
    b, m, f = x.shape
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * m).reshape(-1)
    return x.reshape(b * m, f).index_select(0, flat).view(b, idx.shape[1], f)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a flat buffer with split sizes; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, buf: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = buf.new_empty(sum(recv))
        dist.all_to_all_single(out, buf.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather of every rank's tokens; backward: each token's gradient summed over ranks, sent to its owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
        ctx.lay = lay
        parts = [torch.empty_like(x) for _ in range(lay.size)]
        dist.all_gather(parts, x.contiguous(), group=lay.group)
        b, s, f = x.shape
        stacked = torch.stack(parts, dim=1).view(b, lay.size * s, f)  # rank-major slots
        return take(stacked, lay.inverse)  # (B, N, F) in sequence order

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lay = ctx.lay
        b, n, f = grad.shape
        s = n // lay.size
        pieces = take(grad, lay.index.permute(1, 0, 2).reshape(b, n))  # (B, size * S, F): each rank's tokens
        pieces = pieces.view(b, lay.size, s, f).transpose(0, 1).contiguous()  # (size, B, S, F)
        out = torch.empty_like(pieces)
        dist.all_to_all_single(out, pieces, group=lay.group)  # piece r -> rank r
        return out.sum(0), None


def gather_sequence(x: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """The whole sequence on every rank: x (B, S_local, F) -> (B, N, F) in global order (a collective)."""
    return _GatherSequence.apply(x, lay)


def local_tokens(full: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """This rank's tokens of a whole sequence: (B, N, F) -> (B, S_local, F) (no communication)."""
    return take(full, lay.mine)


def to_heads(x: torch.Tensor, lay: SeqLayout, sends: list[torch.Tensor]) -> torch.Tensor:
    """All-to-all from sequence shards to feature shards (a collective).

    Args:
        x: (B, S_local, F) this rank's tokens, every feature.
        sends: per sp rank, the feature indices (long, on x's device) that rank receives; they may
            repeat or overlap (a feature several ranks need); gradients of repeats are summed.

    Returns:
        (B, N, len(sends[rank])): the whole sequence in global order, this rank's features.
    """
    b, s, _ = x.shape
    mine = len(sends[lay.rank])
    buf = torch.cat([x.index_select(-1, idx).reshape(-1) for idx in sends])
    recv = _AllToAll.apply(buf, [b * s * len(idx) for idx in sends], [b * s * mine] * lay.size, lay.group)
    stacked = recv.view(lay.size, b, s, mine).transpose(0, 1).reshape(b, lay.size * s, mine)
    return take(stacked, lay.inverse)


def to_tokens(y: torch.Tensor, lay: SeqLayout, widths: list[int]) -> torch.Tensor:
    """All-to-all back from feature shards to sequence shards (a collective).

    Args:
        y: (B, N, widths[rank]) the whole sequence, this rank's features.
        widths: every sp rank's feature count.

    Returns:
        (B, S_local, sum(widths)): this rank's tokens, the features of rank 0, then rank 1, ...
    """
    b, n, mine = y.shape
    s = n // lay.size
    pieces = take(y, lay.index.permute(1, 0, 2).reshape(b, n))  # (B, size * S, mine), rank-major
    buf = pieces.view(b, lay.size, s, mine).transpose(0, 1).reshape(-1)
    recv = _AllToAll.apply(buf, [b * s * mine] * lay.size, [b * s * w for w in widths], lay.group)
    return torch.cat([r.view(b, s, w) for r, w in zip(recv.split([b * s * w for w in widths]), widths)], dim=-1)


@dataclass(frozen=True)
class _FetchPlan:
    send: list[torch.Tensor]  # per destination rank: flat (b * S + s) rows of this rank's x to send
    counts_in: list[int]  # rows received from each rank
    slot: torch.Tensor  # (B * W,) row of cat(received, one zero row) that fills each wanted slot


def _fetch_plan(lay: SeqLayout, wants: torch.Tensor) -> _FetchPlan:
    size, b, w = wants.shape
    s = lay.index.shape[-1]
    flat = lay.index.permute(1, 0, 2).reshape(b, size * s).cpu()  # slot -> global index
    owner = torch.empty_like(flat).scatter_(1, flat, torch.arange(size * s).expand(b, -1))  # global -> slot
    wants = wants.cpu()
    send, counts_in, slot = [], [], None
    for dst in range(size):
        want = wants[dst]  # (B, W)
        slot_of = owner.gather(1, want.clamp(min=0))  # (B, W) rank-major slot
        src_rank, src_pos = slot_of // s, slot_of % s
        valid = want >= 0
        rows = torch.arange(b)[:, None] * s + src_pos  # flat row in the source's x
        if dst == lay.rank:
            fill = torch.full((b * w,), -1, dtype=torch.long)
            offset = 0
        for src in range(size):
            take_ = (valid & (src_rank == src)).reshape(-1)  # row-major order over (B, W)
            if src == lay.rank:
                send.append(rows.reshape(-1)[take_])
            if dst == lay.rank:
                n = int(take_.sum())
                fill[take_] = torch.arange(offset, offset + n)
                counts_in.append(n)
                offset += n
        if dst == lay.rank:
            slot = torch.where(fill >= 0, fill, offset)  # offset: the zero row after the received rows
    device = lay.index.device
    return _FetchPlan([t.to(device) for t in send], counts_in, slot.to(device))


def fetch_tokens(x: torch.Tensor, lay: SeqLayout, wants: torch.Tensor) -> torch.Tensor:
    """The tokens at given global indices, from whichever rank holds them (a collective).

    Args:
        x: (B, S_local, F) this rank's tokens.
        wants: (size, B, W) long, for EVERY sp rank the global indices it wants per row; -1 gives zeros.

    Returns:
        (B, W, F): this rank's wanted tokens.
    """
    plan = _fetch_plan(lay, wants)
    b, s, f = x.shape
    rows = x.reshape(b * s, f)
    buf = torch.cat([rows.index_select(0, idx).reshape(-1) for idx in plan.send])
    recv = _AllToAll.apply(buf, [len(idx) * f for idx in plan.send], [n * f for n in plan.counts_in], lay.group)
    table = torch.cat([recv.view(-1, f), x.new_zeros(1, f)])
    return table.index_select(0, plan.slot).view(b, wants.shape[-1], f)
