"""Zigzag sharding of sequences (no attention here).

The global sequence of length N is cut into 2C equal chunks; ring rank r holds chunks r
and 2C-1-r, in that order, so token order inside a shard increases and every rank does the
same causal work. With a Ulysses dimension (U > 1) each ring shard (N / C tokens) is split
further into U contiguous pieces, one per rank of the Ulysses group: sp rank
``ring_rank * U + ulysses_rank`` holds piece ``ulysses_rank`` of ring shard ``ring_rank``; the
all-to-all before attention gives each Ulysses rank the whole ring shard for its heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def zigzag_shard(x: torch.Tensor, *, dim: int, rank: int, ring_size: int) -> torch.Tensor:
    """This rank's zigzag shard of ``x`` along ``dim``.

    Args:
        x: any tensor whose ``dim`` is the full sequence (length N).
        dim: the sequence dimension.
        rank, ring_size: ring rank and ring size C.

    Returns:
        A contiguous tensor with N / C along ``dim``: chunks ``rank`` and ``2C-1-rank``.

    Raises:
        ValueError: N is not a multiple of 2C, or rank is outside [0, C).
    """
    if not 0 <= rank < ring_size:
        raise ValueError(f"rank={rank} must be in [0, ring_size={ring_size})")
    n = x.size(dim)
    if n % (2 * ring_size) != 0:
        raise ValueError(f"sequence length {n} (dim {dim}) must be a multiple of 2 * ring size = "
                         f"{2 * ring_size}; pad it (shard_batch pads with ignored labels)")
    chunks = x.chunk(2 * ring_size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * ring_size - 1 - rank]], dim=dim).contiguous()


def zigzag_unshard(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None,
                   cu_seqlens=None) -> torch.Tensor:
    """All-gather the zigzag shards of the ring and return the full sequence along ``dim``.

    Not differentiable (it is for gathering outputs: logits, hidden states).

    Args:
        cu_seqlens: for shards made per document (``document_zigzag_shard``, the
            ``ring_documents`` of ``shard_batch``): that row's document boundaries.

    Raises:
        ValueError: the local length along ``dim`` is odd.
    """
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if x.size(dim) % 2 != 0:
        raise ValueError(f"a zigzag shard has an even length along dim {dim}; got {x.size(dim)}")
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    docs = [x.size(dim) * world] if cu_seqlens is None else [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    out, off = [], 0
    for length in docs:  # each document (or the whole sequence) was cut into 2C chunks
        n = length // (2 * world)
        first = [p.narrow(dim, off, n) for p in parts]
        second = [p.narrow(dim, off + n, n) for p in reversed(parts)]
        out += first + second
        off += 2 * n
    return torch.cat(out, dim=dim)


def shard_index(layout: str, rank: int, ring_size: int, local_len: int, cu_seqlens=None, *,
                ulysses_rank: int = 0, ulysses_size: int = 1) -> torch.Tensor:
    """Global token indices (S_local,) held by ring rank ``rank`` (and Ulysses rank ``ulysses_rank``).

    ``x_shard = x_full[..., shard_index(...)]`` for ``zigzag_shard`` / ``document_zigzag_shard``
    ("zigzag" / "zigzag_docs", ``cu_seqlens`` the row's document bounds) and contiguous shards;
    with ``ulysses_size`` U > 1, for piece ``ulysses_rank`` of U of that ring shard (what
    ``shard_batch`` gives that rank). ``local_len`` is this rank's token count (N / (C * U)).
    """
    from .plan import segments  # the planner's view of a shard is the one source of truth

    segs = segments(layout, rank, ring_size, local_len * ulysses_size,
                    None if cu_seqlens is None else tuple(cu_seqlens))
    index = torch.cat([torch.arange(s.global_start, s.global_start + s.length) for s in segs])
    return index[ulysses_rank * local_len:(ulysses_rank + 1) * local_len]


def sp_shard_index(layout: str, sp_rank: int, sp_size: int, local_len: int, cu_seqlens=None, *,
                   ulysses_size: int = 1) -> torch.Tensor:
    """Global token indices (S_local,) held by sequence-parallel rank ``sp_rank`` of ``sp_size`` = U * C.

    ``shard_index`` addressed by the sp rank (``RingGroups.sp_rank``; ring rank = sp_rank // U,
    Ulysses rank = sp_rank % U). With U = 1 it is ``shard_index(layout, sp_rank, sp_size, ...)``.

    Raises:
        ValueError: ``ulysses_size`` does not divide ``sp_size``, or ``sp_rank`` is out of range.
    """
    if ulysses_size < 1 or sp_size % ulysses_size or not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank={sp_rank}, sp_size={sp_size}, ulysses_size={ulysses_size}: need "
                         "0 <= sp_rank < sp_size and ulysses_size dividing sp_size")
    return shard_index(layout, sp_rank // ulysses_size, sp_size // ulysses_size, local_len, cu_seqlens,
                       ulysses_rank=sp_rank % ulysses_size, ulysses_size=ulysses_size)


def gather_sequence(x: torch.Tensor, batch: dict | None = None, groups=None, *, dim: int = 1) -> torch.Tensor:
    """All-gather this sp group's shards of ``x`` and return the full (padded) sequences along ``dim``.

    Works for every layout ``shard_batch`` makes (zigzag, per-document zigzag, any Ulysses x
    ring split). A collective over ``groups.sp_group``; not differentiable (it is for outputs:
    logits, hidden states). The result is in the padded row's order: ``shard_batch`` pads at the
    end of the row, or with ``ring_layout == "zigzag_docs"`` at the end of every document
    (``batch["ring_documents"]`` gives the padded bounds).

    Args:
        x: this rank's shard, (B, S_local, ...) with the sequence along ``dim``.
        batch: the dict ``shard_batch`` returned (its ``ring_layout`` and ``ring_documents``); None:
            plain zigzag.
        groups: the ``RingGroups`` used for ``shard_batch`` (None: one process, ``x`` is returned).
        dim: the sequence dimension (not 0 when rows were packed differently).

    Returns:
        (B, N_padded, ...) on every rank of the sp group.

    Raises:
        ValueError: ``dim`` is the batch dimension while rows have different document bounds.
    """
    sp = 1 if groups is None else groups.sp_size
    if sp == 1:
        return x
    layout = "zigzag" if batch is None else batch.get("ring_layout", "zigzag")
    docs = (None,) if batch is None or layout != "zigzag_docs" else tuple(batch["ring_documents"])
    return gather_shards(x, dim=dim, group=groups.sp_group, sp_size=sp, ulysses_size=groups.ulysses_size,
                         layout=layout, documents=docs)


def gather_shards(x: torch.Tensor, *, dim: int, group, sp_size: int, ulysses_size: int, layout: str,
                  documents: tuple = (None,)) -> torch.Tensor:
    """``gather_sequence`` on explicit arguments: ``documents`` per row (or one entry for all rows)."""
    dim = dim % x.dim()
    local = x.size(dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(sp_size)]
    dist.all_gather(parts, x, group=group)
    gathered = torch.cat(parts, dim=dim)  # sp rank r's shard at slots [r * S_local, (r + 1) * S_local)

    def order(cu) -> torch.Tensor:  # global index of every gathered slot
        return torch.cat([sp_shard_index(layout, r, sp_size, local, cu, ulysses_size=ulysses_size)
                          for r in range(sp_size)]).to(x.device)

    if len(set(documents)) == 1:
        return torch.empty_like(gathered).index_copy_(dim, order(documents[0]), gathered)
    if dim == 0:
        raise ValueError("rows packed with different document bounds are gathered row by row: the sequence "
                         "dim cannot be the batch dim 0")
    return torch.cat([torch.empty_like(g).index_copy_(dim, order(cu), g)
                      for g, cu in zip(gathered.split(1, dim=0), documents)])


def document_zigzag_shard(x: torch.Tensor, *, dim: int, rank: int, ring_size: int, cu_seqlens) -> torch.Tensor:
    """Zigzag-shard every document of ``cu_seqlens`` on its own and concatenate the shards.

    Every document's length must be a multiple of 2 * ring_size; each rank then does the
    same causal work for every document (layout ``zigzag_docs``).
    """
    pieces = [zigzag_shard(x.narrow(dim, a, b - a), dim=dim, rank=rank, ring_size=ring_size)
              for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    return torch.cat(pieces, dim=dim)


IGNORE_INDEX = -100
_SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")


def shift_labels(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets on the FULL sequence: target[i] = labels[i + 1], last = -100.

    Where ``position_ids`` restart (packed documents: position i+1 does not follow
    position i by 1), target[i] = -100: a document's first token is not the target of the
    previous document's last token.

    Shapes: labels (B, N); position_ids (B, N) or (1, N). Returns (B, N).
    """
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        new_doc = torch.diff(position_ids.expand_as(labels), dim=-1) != 1  # (B, N - 1)
        target[:, :-1] = target[:, :-1].masked_fill(new_doc, IGNORE_INDEX)
    return target


def shard_batch(batch: dict, groups=None, *, num_items_in_batch: float | torch.Tensor | None = None,
                pad_token_id: int = 0, balance_documents: bool = True) -> dict:
    """Shift labels on the full sequences, pad to a multiple of 2 * U * C, zigzag-shard.

    No communication: every rank of an sp group (U * C ranks) calls it on the same full batch and keeps
    its shard (see the module docstring for the Ulysses x ring layout).

    Args:
        batch: full sequences of this ring: ``input_ids`` (B, N), optional ``labels`` (B, N)
            (transformers convention: unshifted, -100 ignored), ``position_ids`` (B or 1, N;
            default 0..N-1; restarts mark packed documents) and ``attention_mask`` (all ones, or
            right padding, which becomes ignored labels).
        groups: a ``RingGroups`` (default: one process, no sharding).
        num_items_in_batch: the loss divisor. Default (only when ``groups.dp_size == 1``): this
            sp group's valid targets / sp_size, so that DDP's gradient average over its ranks
            equals the single-device update on the batch. With several data-parallel rings the
            count must span them all: use ``hf_ring_attention.shard_window(batches, groups)`` (one
            all-reduce for a whole accumulation window) or pass your own count the same way.
        pad_token_id: token id used for the padding (its labels are ignored).
        balance_documents: for packed rows (position_ids restart) on a ring (C > 1), pad every
            document to a multiple of 2C and zigzag-shard each document on its own over the ring, so
            all ranks do the same work whatever the document lengths (layout ``zigzag_docs``); the
            row is padded to a multiple of 2 * C * U with a padding document.

    Returns:
        A dict for ``model(**batch)``: ``input_ids``, ``position_ids`` (global positions of this
        rank's tokens, for RoPE; padding repeats the last real position, so the largest position is
        a real one), ``ring_layout`` (``"zigzag"`` or ``"zigzag_docs"``), ``ring_documents`` (per row,
        the global document boundaries of the padded row, ``(0, ..., N_padded)``), for ``zigzag_docs``
        ``ring_padding_between_documents`` (per row: whether padding sits between two documents, which
        token mixers outside attention refuse) and, with labels,
        ``labels`` and ``shift_labels`` (the shifted, sharded targets) and ``num_items_in_batch``.

    Raises:
        ValueError: unknown keys, left padding, shapes that do not match, or no divisor with dp_size > 1.
    """
    ids, pos, target = full_targets(batch)
    out = shard_sequences(ids, pos, target, groups, pad_token_id=pad_token_id, balance_documents=balance_documents)
    if target is not None:
        if num_items_in_batch is None:
            dp = 1 if groups is None else groups.dp_size
            if dp > 1:
                raise ValueError(f"with dp_size={dp} data-parallel rings the loss divisor counts the targets of "
                                 "every ring: use hf_ring_attention.shard_window([batch, ...], groups) (one "
                                 "all-reduce per accumulation window), or pass num_items_in_batch = (valid targets "
                                 "over all rings) / world_size")
            sp = 1 if groups is None else groups.sp_size
            num_items_in_batch = torch.clamp((target != IGNORE_INDEX).sum().to(torch.float64), min=1.0) / sp
        out["num_items_in_batch"] = num_items_in_batch
    return out


def full_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate a full batch; return ids (B, N), position ids (B or 1, N) and shifted targets (B, N) or None.

    Raises:
        ValueError: unknown keys, left or inner padding, shapes that do not match.
    """
    unknown = set(batch) - set(_SEQUENCE_KEYS)
    if unknown:
        raise ValueError(f"shard_batch does not know how to shard {sorted(unknown)}; it takes {_SEQUENCE_KEYS}")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq); got shape {tuple(ids.shape)}")
    n = ids.shape[1]
    pos = batch.get("position_ids")
    pos = torch.arange(n, device=ids.device).unsqueeze(0) if pos is None else pos
    if pos.dim() != 2 or pos.shape[-1] != n or pos.shape[0] not in (1, ids.shape[0]):
        raise ValueError(f"position_ids must be (batch or 1, {n}); got {tuple(pos.shape)}")
    labels = batch.get("labels")
    target = None
    if labels is not None:
        if labels.shape != ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(ids.shape)}")
        target = shift_labels(labels, pos)
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        valid = mask.bool()
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("attention_mask has left or inner padding; ring attention supports right padding "
                             "only (or none): pack or right-pad the sequences")
        if target is not None:  # right padding: pads are never attended by real tokens (causal)
            target = target.masked_fill(~valid, IGNORE_INDEX)
            target[:, :-1] = target[:, :-1].masked_fill(~valid[:, 1:], IGNORE_INDEX)
    return ids, pos, target


def shard_sequences(ids: torch.Tensor, pos: torch.Tensor, target: torch.Tensor | None, groups=None, *,
                    pad_token_id: int = 0, balance_documents: bool = True) -> dict:
    """Pad and zigzag-shard full rows: ids (B, N), positions (B or 1, N), shifted targets (B, N) or None.

    What ``shard_batch`` returns, without ``num_items_in_batch`` (no communication). Rows are padded
    to a multiple of 2 * U * C (zigzag over the ring, then U pieces of every ring shard).
    """
    b, n = ids.shape
    ring = 1 if groups is None else groups.ring_size
    rank = 0 if groups is None else groups.ring_rank
    uly, piece = (1, 0) if groups is None else (groups.ulysses_size, groups.ulysses_rank)
    pos = pos.expand(b, -1)
    if balance_documents and ring > 1 and bool((torch.diff(pos, dim=-1) != 1).any()):
        return _shard_documents(ids, pos, target, ring, rank, uly, piece, pad_token_id)
    bounds = [_row_documents(p) for p in pos]  # before padding: the padding joins the last document
    pad = (-n) % (2 * ring * uly)
    if pad:  # padding goes at the end: causal attention keeps real tokens from seeing it
        ids = torch.nn.functional.pad(ids, (0, pad), value=pad_token_id)
        pos = torch.cat([pos, pos[:, -1:].expand(-1, pad)], dim=1)  # repeats the last position
        if target is not None:
            target = torch.nn.functional.pad(target, (0, pad), value=IGNORE_INDEX)

    def shard(x):  # this ring rank's zigzag shard, then this Ulysses rank's contiguous piece of it
        x = zigzag_shard(x, dim=1, rank=rank, ring_size=ring)
        return x if uly == 1 else x.chunk(uly, dim=1)[piece].contiguous()

    out = {"input_ids": shard(ids), "position_ids": shard(pos),
           "ring_layout": "zigzag", "ring_documents": tuple((*cu[:-1], n + pad) for cu in bounds)}
    if target is not None:
        local = shard(target)
        out.update(labels=local, shift_labels=local)
    return out


def _row_documents(pos: torch.Tensor) -> tuple[int, ...]:
    """Global document boundaries (0, ..., N) of one row from its position ids (N,)."""
    cut = (torch.nonzero(torch.diff(pos) != 1).flatten() + 1).tolist()
    return (0, *cut, pos.shape[-1])


def _pad_documents(ids, pos, target, multiple: int, pad_token_id: int, row_multiple: int | None = None):
    """Pad every document of each row to a multiple of ``multiple``; rows to one length, a multiple of
    ``row_multiple`` (itself a multiple of ``multiple``; default ``multiple``).

    Padding goes at the end of each document (causal: its real tokens never see it), with
    continuing positions and ignored targets. Returns padded (ids, pos, target) and per-row
    document boundaries.
    """
    rows, bounds = [], []
    for r in range(ids.shape[0]):
        cut = _row_documents(pos[r])
        pieces, cu = [], [0]
        for a, b in zip(cut, cut[1:]):
            extra = (-(b - a)) % multiple
            p = pos[r, a:b]
            pieces.append((torch.nn.functional.pad(ids[r, a:b], (0, extra), value=pad_token_id),
                           torch.cat([p, p[-1:].expand(extra)]),  # padding repeats the last position
                           None if target is None else torch.nn.functional.pad(target[r, a:b], (0, extra),
                                                                                value=IGNORE_INDEX)))
            cu.append(cu[-1] + b - a + extra)
        rows.append(pieces)
        bounds.append(cu)
    longest = max(cu[-1] for cu in bounds)
    longest += (-longest) % (row_multiple or multiple)
    out_ids, out_pos, out_t = [], [], []
    for pieces, cu in zip(rows, bounds):
        tail = longest - cu[-1]
        if tail:  # a padding document of its own, so rows line up
            dev = ids.device
            pieces.append((torch.full((tail,), pad_token_id, dtype=ids.dtype, device=dev),
                           torch.zeros(tail, dtype=pos.dtype, device=dev),
                           None if target is None else torch.full((tail,), IGNORE_INDEX, dtype=target.dtype,
                                                                  device=dev)))
            cu.append(longest)
        out_ids.append(torch.cat([p[0] for p in pieces]))
        out_pos.append(torch.cat([p[1] for p in pieces]))
        if target is not None:
            out_t.append(torch.cat([p[2] for p in pieces]))
    return (torch.stack(out_ids), torch.stack(out_pos), torch.stack(out_t) if target is not None else None,
            [tuple(cu) for cu in bounds])


def _shard_documents(ids, pos, target, ring: int, rank: int, uly: int, piece: int, pad_token_id) -> dict:
    # Documents padded to 2C (per-document zigzag over the ring); the row to 2C * U with a padding
    # document (a multiple of 2C itself), so every ring shard splits into U equal pieces.
    cuts = [_row_documents(p) for p in pos]  # before padding
    # Padding between documents (a document before the row's last one not a multiple of 2C): harmless
    # to attention (no document sees another's tokens) but not to a recurrence carried across documents.
    between = tuple(any((b - a) % (2 * ring) for a, b in zip(cut[:-2], cut[1:-1])) for cut in cuts)
    ids, pos, target, bounds = _pad_documents(ids, pos, target, 2 * ring, pad_token_id, 2 * ring * uly)

    def shard(x):
        rows = torch.stack([document_zigzag_shard(x[r], dim=0, rank=rank, ring_size=ring, cu_seqlens=cu)
                            for r, cu in enumerate(bounds)])
        return rows if uly == 1 else rows.chunk(uly, dim=1)[piece].contiguous()

    out = {"input_ids": shard(ids), "position_ids": shard(pos), "ring_layout": "zigzag_docs",
           "ring_documents": tuple(bounds), "ring_padding_between_documents": between}
    if target is not None:
        local = shard(target)
        out.update(labels=local, shift_labels=local)
    return out
