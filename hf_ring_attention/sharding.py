"""Zigzag sharding of sequences (no attention here).

The global sequence of length N is cut into 2C equal chunks; ring rank r holds chunks
r and 2C-1-r, in that order, so token order inside a shard increases and every rank
does the same causal work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def zigzag_shard(x: torch.Tensor, *, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's zigzag shard of ``x`` along ``dim``.

    Args:
        x: any tensor whose ``dim`` is the full sequence (length N).
        dim: the sequence dimension.
        rank, world_size: ring rank and ring size C.

    Returns:
        A contiguous tensor with N / C along ``dim``: chunks ``rank`` and ``2C-1-rank``.

    Raises:
        ValueError: N is not a multiple of 2C, or rank is outside [0, C).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    n = x.size(dim)
    if n % (2 * world_size) != 0:
        raise ValueError(f"sequence length {n} (dim {dim}) must be a multiple of 2 * ring size = "
                         f"{2 * world_size}; pad it (shard_batch pads with ignored labels)")
    chunks = x.chunk(2 * world_size, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=dim).contiguous()


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


def document_zigzag_shard(x: torch.Tensor, *, dim: int, rank: int, world_size: int, cu_seqlens) -> torch.Tensor:
    """Zigzag-shard every document of ``cu_seqlens`` on its own and concatenate the shards.

    Every document's length must be a multiple of 2 * world_size; each rank then does the
    same causal work for every document (layout ``zigzag_docs``).
    """
    pieces = [zigzag_shard(x.narrow(dim, a, b - a), dim=dim, rank=rank, world_size=world_size)
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
    """Shift labels on the full sequences, pad to a multiple of 2 * ring_size, zigzag-shard.

    Args:
        batch: full sequences of this ring: ``input_ids`` (B, N), optional ``labels`` (B, N)
            (transformers convention: unshifted, -100 ignored), ``position_ids`` (B or 1, N;
            default 0..N-1; restarts mark packed documents) and ``attention_mask`` (all ones, or
            right padding, which becomes ignored labels).
        groups: a ``RingGroups`` (default: one process, no sharding).
        num_items_in_batch: the loss divisor. Default: valid targets of the whole global
            batch (summed over data-parallel rings) / (dp_size * ring_size), so that DDP's
            gradient average over all ranks equals the single-device update on the global batch.
            Pass your own (e.g. counted over a gradient-accumulation window, the same way).
        pad_token_id: token id used for the padding (its labels are ignored).
        balance_documents: for packed rows (position_ids restart) on a ring, pad every document
            to a multiple of 2 * ring_size and zigzag-shard each document on its own, so all
            ranks do the same work whatever the document lengths. The boundaries travel to the
            attention function as ``ring_documents``.

    Returns:
        A dict for ``model(**batch)``: ``input_ids``, ``position_ids`` (global positions of this
        rank's tokens, for RoPE) and, with labels, ``labels`` and ``shift_labels`` (the shifted,
        sharded targets) and ``num_items_in_batch``; for balanced packed rows also
        ``ring_documents`` (per row, the padded global document boundaries).

    Raises:
        ValueError: unknown keys, left padding, or shapes that do not match.
    """
    unknown = set(batch) - set(_SEQUENCE_KEYS)
    if unknown:
        raise ValueError(f"shard_batch does not know how to shard {sorted(unknown)}; it takes {_SEQUENCE_KEYS}")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq); got shape {tuple(ids.shape)}")
    b, n = ids.shape
    pos = batch.get("position_ids")
    pos = torch.arange(n, device=ids.device).unsqueeze(0) if pos is None else pos
    if pos.dim() != 2 or pos.shape[-1] != n:
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

    ring = 1 if groups is None else groups.ring_size
    rank = 0 if groups is None else groups.ring_rank
    pos = pos.expand(b, -1)
    if balance_documents and ring > 1 and bool((torch.diff(pos, dim=-1) != 1).any()):
        return _shard_documents(ids, pos, target, groups, num_items_in_batch, pad_token_id)
    pad = (-n) % (2 * ring)
    if pad:  # padding goes at the end: causal attention keeps real tokens from seeing it
        ids = torch.nn.functional.pad(ids, (0, pad), value=pad_token_id)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)], dim=1)
        if target is not None:
            target = torch.nn.functional.pad(target, (0, pad), value=IGNORE_INDEX)

    out = {"input_ids": zigzag_shard(ids, dim=1, rank=rank, world_size=ring),
           "position_ids": zigzag_shard(pos, dim=1, rank=rank, world_size=ring)}
    if target is not None:
        if num_items_in_batch is None:
            num_items_in_batch = global_loss_tokens(target, groups)
        local = zigzag_shard(target, dim=1, rank=rank, world_size=ring)
        out.update(labels=local, shift_labels=local, num_items_in_batch=num_items_in_batch)
    return out


def global_loss_tokens(targets: torch.Tensor, groups=None) -> torch.Tensor:
    """Loss divisor for shifted ``targets`` of this ring's full batch (see ``shard_batch``).

    Returns (valid targets summed over the data-parallel rings) / (dp_size * ring_size),
    at least 1e-9 times that so an all-ignored batch gives loss 0 instead of NaN.
    """
    count = (targets != IGNORE_INDEX).sum().to(torch.float64)
    if groups is not None and groups.dp_size > 1:
        count = count.to(targets.device)
        dist.all_reduce(count, group=groups.dp_group)
    world = 1 if groups is None else groups.world_size
    return torch.clamp(count, min=1.0) / world


def _pad_documents(ids, pos, target, multiple: int, pad_token_id: int):
    """Pad every document of each row to a multiple of ``multiple``; rows to one length.

    Padding goes at the end of each document (causal: its real tokens never see it), with
    continuing positions and ignored targets. Returns padded (ids, pos, target) and per-row
    document boundaries.
    """
    rows, bounds = [], []
    for r in range(ids.shape[0]):
        cut = [0, *(torch.nonzero(torch.diff(pos[r]) != 1).flatten() + 1).tolist(), ids.shape[1]]
        pieces, cu = [], [0]
        for a, b in zip(cut, cut[1:]):
            extra = (-(b - a)) % multiple
            p = pos[r, a:b]
            pieces.append((torch.nn.functional.pad(ids[r, a:b], (0, extra), value=pad_token_id),
                           torch.cat([p, p[-1] + torch.arange(1, extra + 1, device=p.device)]),
                           None if target is None else torch.nn.functional.pad(target[r, a:b], (0, extra),
                                                                                value=IGNORE_INDEX)))
            cu.append(cu[-1] + b - a + extra)
        rows.append(pieces)
        bounds.append(cu)
    longest = max(cu[-1] for cu in bounds)
    out_ids, out_pos, out_t = [], [], []
    for pieces, cu in zip(rows, bounds):
        tail = longest - cu[-1]
        if tail:  # a padding document of its own, so rows line up
            dev = ids.device
            pieces.append((torch.full((tail,), pad_token_id, dtype=ids.dtype, device=dev),
                           torch.arange(tail, device=dev),
                           None if target is None else torch.full((tail,), IGNORE_INDEX, dtype=target.dtype,
                                                                  device=dev)))
            cu.append(longest)
        out_ids.append(torch.cat([p[0] for p in pieces]))
        out_pos.append(torch.cat([p[1] for p in pieces]))
        if target is not None:
            out_t.append(torch.cat([p[2] for p in pieces]))
    return (torch.stack(out_ids), torch.stack(out_pos), torch.stack(out_t) if target is not None else None,
            [tuple(cu) for cu in bounds])


def _shard_documents(ids, pos, target, groups, num_items_in_batch, pad_token_id) -> dict:
    ring, rank = groups.ring_size, groups.ring_rank
    ids, pos, target, bounds = _pad_documents(ids, pos, target, 2 * ring, pad_token_id)

    def shard(x):
        return torch.stack([document_zigzag_shard(x[r], dim=0, rank=rank, world_size=ring, cu_seqlens=cu)
                            for r, cu in enumerate(bounds)])

    out = {"input_ids": shard(ids), "position_ids": shard(pos), "ring_documents": tuple(bounds)}
    if target is not None:
        if num_items_in_batch is None:
            num_items_in_batch = global_loss_tokens(target, groups)
        local = shard(target)
        out.update(labels=local, shift_labels=local, num_items_in_batch=num_items_in_batch)
    return out
