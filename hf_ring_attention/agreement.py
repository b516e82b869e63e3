"""Agreement before communication: every rank of a ring checks that its peers hold the same kind of shard.

``agree(fields, error, group=...)`` is ONE small collective (an all-gather of a few int64s per
rank, one host sync). Each rank contributes a signature (shapes, dtype, layout, window, a hash
of the document bounds, ...) and its own local validation verdict. When any rank's verdict is an
error, or any field differs between ranks, EVERY rank raises the same ``RingMismatchError``
naming the rank and the field, before any ring communication starts; no rank raises alone while
its peers wait in a collective. Only on that error path a second collective gathers the
readable values (and messages) for the error text.

A rank that never arrives (it raised elsewhere and went on) surfaces on its peers as
``RingCommError`` after the group's timeout.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from .comm import RingCommError

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class RingMismatchError(ValueError):
    """The ranks of a ring disagree on what they hold, or one of them failed its local checks."""


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 99


def stable_hash(value: Any) -> int:
    """A hash that is the same in every process (Python's ``hash`` of str is salted per process)."""
    return zlib.crc32(repr(value).encode())


def agree(fields: dict[str, Any], error: str | None, *, group: dist.ProcessGroup | None, device: torch.device,
          what: str, extra: tuple[int, ...] = ()) -> list[list[int]]:
    """Check, with one all-gather over ``group``, that every rank has the same ``fields`` and no error.

    Args:
        fields: name -> value; ints are compared as they are, anything else through ``stable_hash``
            of its repr (keep values small and deterministic: tuples of ints, strings, None).
        error: this rank's local validation verdict (None: fine).
        group: the ranks that must agree (None: the default group).
        device: where the small signature tensor lives (CUDA for NCCL).
        what: names the call in the error ("ring_attention", "the ring forward of LlamaForCausalLM").
        extra: ints gathered but not compared (e.g. this rank's largest position), for callers
            that reduce them over the ranks.

    Returns:
        Every rank's ``extra`` (a list of tuples in rank order, the same on every rank).

    Raises:
        RingMismatchError: on every rank, when a rank reported an error or a field differs.
        RingCommError: a peer did not join within the group's timeout.
    """
    codes = [v if isinstance(v, int) and not isinstance(v, bool) else stable_hash(v) for v in fields.values()]
    mine = torch.tensor([0 if error is None else 1, *codes, *extra], dtype=torch.int64, device=device)
    size = dist.get_world_size(group)
    rows = [torch.empty_like(mine) for _ in range(size)]
    try:
        dist.all_gather(rows, mine, group=group)
    except RuntimeError as e:
        raise RingCommError(f"{what}: the agreement all-gather over {size} ranks failed or timed out; a peer "
                            "raised before this call and went on, or runs different code "
                            f"({type(e).__name__}: {str(e)[:300]})") from e
    table = torch.stack(rows).tolist()  # the one host sync
    failed = [r for r, row in enumerate(table) if row[0]]
    differ = [name for i, name in enumerate(fields) if len({row[i + 1] for row in table}) > 1]
    if not failed and not differ:
        return [tuple(row[1 + len(codes):]) for row in table]
    # Error path only: every rank takes it (they all see the same table), so this second
    # collective is matched on every rank.
    readable = [None] * size
    dist.all_gather_object(readable, (error, {k: repr(v) for k, v in fields.items()}), group=group)
    if failed:
        r = failed[0]
        others = f" (ranks {failed} failed)" if len(failed) > 1 else ""
        raise RingMismatchError(f"{what}: rank {r} of the ring failed its checks{others}: {readable[r][0]}")
    name = differ[0]
    values = ", ".join(f"rank {r}: {readable[r][1][name]}" for r in range(size))
    more = f" (also differing: {', '.join(differ[1:])})" if len(differ) > 1 else ""
    odd = _odd_ones_out([row[list(fields).index(name) + 1] for row in table])
    raise RingMismatchError(f"{what}: the ranks of the ring disagree on {name} ({values}){more}; rank(s) {odd} "
                            "differ from the rest. Every rank must hold a shard of the same sequences "
                            "(shard them with hf_ring_attention.shard_batch on every rank)")


def _odd_ones_out(values: list[int]) -> list[int]:
    """Ranks whose value differs from the most common one."""
    common = max(set(values), key=values.count)
    return [r for r, v in enumerate(values) if v != common]
