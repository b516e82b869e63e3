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


def zigzag_unshard(x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather the zigzag shards of the ring and return the full sequence along ``dim``.

    Not differentiable (it is for gathering outputs: logits, hidden states).

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
    halves = [p.chunk(2, dim=dim) for p in parts]
    order = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(order, dim=dim)
