"""Which sub-blocks each ring step computes (layouts and masks, no communication).

A shard is a list of ``Segment``s: runs of consecutive global token indices.
``zigzag`` (load-balanced causal): the sequence is cut into 2C equal chunks and ring rank
r holds chunks r and 2C-1-r. ``contiguous``: rank r holds chunk r of C.
``zigzag_docs`` (packed documents): the zigzag cut applied to every document on its own
(each document's length a multiple of 2C), so every rank does the same causal work for
every document, whatever the mix of document lengths; a rank's shard is, document after
document, chunks r and 2C-1-r of that document.

Every query row p may attend the keys of one interval of global indices ``[lo(p), hi(p)]``:
causal gives hi = p; a sliding window W gives lo = p - W + 1 (transformers' convention
``kv_idx > q_idx - W``); packed documents clip both to p's document. So for a (query
segment, key segment) pair the allowed set of each row is an interval, and the pair is
skipped, computed in full, computed with the plain causal kernel (diagonal), or computed
in row tiles with an explicit mask built from the intervals. Tiles narrow their key range
to what their rows can see, so a sliding window or short documents cost little more than
the allowed pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LAYOUTS = ("zigzag", "contiguous", "zigzag_docs")
TILE_ROWS = 512  # query rows per masked tile: bounds the explicit mask at 512 x Sk


@dataclass(frozen=True)
class Segment:
    local_start: int
    length: int
    global_start: int
    doc: int = -1  # document index for zigzag_docs (segments of different documents never interact)


@dataclass
class Task:
    q: slice  # local query rows
    k: slice  # rows of the source shard's K/V
    kind: Literal["full", "causal", "masked"]
    # For "masked": each row's allowed key interval [lo, hi], as offsets into the k slice.
    # Plans are cached, so we keep these O(rows) bounds and build the mask on use.
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """bool (len q, len k), True = attend, built on ``device``; None unless kind == "masked"."""
        if self.bounds is None:
            return None
        lo, hi = (b.to(device, non_blocking=True) for b in self.bounds)
        cols = torch.arange(self.k.stop - self.k.start, device=device)
        return (cols >= lo[:, None]) & (cols <= hi[:, None])


def segments(layout: str, rank: int, ring_size: int, local_len: int,
             cu_seqlens: tuple[int, ...] | None = None) -> list[Segment]:
    """The global index runs held by ``rank`` for a local shard of ``local_len`` tokens."""
    if layout == "zigzag_docs":
        segs, local = [], 0
        for d, (a, b) in enumerate(zip(cu_seqlens, cu_seqlens[1:])):
            n = (b - a) // (2 * ring_size)
            segs += [Segment(local, n, a + rank * n, d), Segment(local + n, n, a + (2 * ring_size - 1 - rank) * n, d)]
            local += 2 * n
        return segs
    if layout == "zigzag":
        n = local_len // 2
        return [Segment(0, n, rank * n), Segment(n, n, (2 * ring_size - 1 - rank) * n)]
    if layout == "contiguous":
        return [Segment(0, local_len, rank * local_len)]
    raise ValueError(f"layout={layout!r} is not known; choose one of {LAYOUTS}")


@dataclass(frozen=True)
class MaskSpec:
    """What restricts attention: causality, a sliding window, document boundaries."""

    causal: bool = True
    window: int | None = None  # keys with q - k < window are kept (transformers' sliding_window)
    cu_seqlens: tuple[int, ...] | None = None  # global document boundaries, 0 ... N

    def bounds(self, pos: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Allowed key interval [lo, hi] (inclusive, global) of each query position ``pos``."""
        lo = torch.zeros_like(pos)
        hi = pos.clone() if self.causal else torch.full_like(pos, total - 1)
        if self.window is not None:
            lo = torch.clamp(pos - self.window + 1, min=0)
        if self.cu_seqlens is not None:
            cu = torch.tensor(self.cu_seqlens, dtype=pos.dtype)
            doc = torch.searchsorted(cu, pos, right=True) - 1
            lo = torch.maximum(lo, cu[doc])
            hi = torch.minimum(hi, cu[doc + 1] - 1)
        return lo, hi


def _pair_tasks(qs: Segment, ks: Segment, lo: torch.Tensor, hi: torch.Tensor, spec: MaskSpec,
                tile_rows: int, split_bands: bool = False) -> list[Task]:
    """Tasks for one (query segment, key segment) pair; lo/hi are the segment rows' bounds."""
    k0, k1 = ks.global_start, ks.global_start + ks.length - 1
    clo, chi = lo.clamp(min=k0), hi.clamp(max=k1)
    q_sl = slice(qs.local_start, qs.local_start + qs.length)
    k_sl = slice(ks.local_start, ks.local_start + ks.length)
    if not bool((clo <= chi).any()):
        return []
    if bool((lo <= k0).all()) and bool((hi >= k1).all()):
        return [Task(q_sl, k_sl, "full")]
    pos = torch.arange(qs.global_start, qs.global_start + qs.length)
    if qs.global_start == k0 and qs.length == ks.length and bool((lo <= k0).all()) and bool((hi == pos).all()):
        return [Task(q_sl, k_sl, "causal")]
    tasks = []
    for t0 in range(0, qs.length, tile_rows):
        tlo, thi = clo[t0:t0 + tile_rows], chi[t0:t0 + tile_rows]
        has = tlo <= thi
        if not bool(has.any()):
            continue
        a, b = int(tlo[has].min()), int(thi[has].max())  # key range the tile can see
        ksub = slice(ks.local_start + a - k0, ks.local_start + b - k0 + 1)
        qsub = slice(qs.local_start + t0, qs.local_start + t0 + len(tlo))
        if bool((tlo <= a).all()) and bool((thi >= b).all()):
            tasks.append(Task(qsub, ksub, "full"))
            continue
        split = _split_tile(qsub, pos[t0:t0 + tile_rows], tlo, thi, ks) if split_bands and bool(has.all()) else None
        tasks += split or [Task(qsub, ksub, "masked", (tlo - a, thi - a))]
    return tasks


def _split_tile(qsub: slice, pos: torch.Tensor, tlo: torch.Tensor, thi: torch.Tensor, ks: Segment) -> list[Task] | None:
    """A tile whose rows see different key intervals (a sliding window's band) as: the causal
    square on the diagonal, a full block of the keys every row sees, and masked strips for the
    rest, so that only the strips (about tile_rows^2 / 2 pairs) pay for an explicit mask.
    None where the full and causal blocks would not cover half the tile's key range."""
    k0 = ks.global_start
    kslice = lambda a, b: slice(ks.local_start + a - k0, ks.local_start + b - k0 + 1)  # noqa: E731 - global [a, b]
    first, n = int(pos[0]), len(pos)
    lo_min, lo_max, hi_min, hi_max = int(tlo.min()), int(tlo.max()), int(thi.min()), int(thi.max())
    width = hi_max - lo_min + 1  # the tile's key range
    tasks = []
    if bool((thi == pos).all()) and first >= k0 and lo_max <= first:
        tasks.append(Task(qsub, kslice(first, first + n - 1), "causal"))  # row i: keys first .. first + i
        hi_min = hi_max = first - 1  # what is left of every row ends before the square: no right strip
    if lo_max > hi_min + 1:
        return None  # the rows share no key
    if 2 * (max(hi_min - lo_max + 1, 0) + (n if tasks else 0)) < width:
        return None
    if lo_max <= hi_min:
        tasks.append(Task(qsub, kslice(lo_max, hi_min), "full"))
    if lo_min < lo_max:  # left strip: row i sees [tlo_i, lo_max - 1]
        tasks.append(Task(qsub, kslice(lo_min, lo_max - 1), "masked",
                          (tlo - lo_min, torch.full_like(tlo, lo_max - 1 - lo_min))))
    if hi_max > hi_min:  # right strip: row i sees [hi_min + 1, thi_i]
        tasks.append(Task(qsub, kslice(hi_min + 1, hi_max), "masked", (torch.zeros_like(thi), thi - hi_min - 1)))
    return tasks


def _merge_full(tasks: list[Task]) -> list[Task]:
    """Fuse full tasks that are adjacent in q (same k) or in k (same q): fewer, larger calls."""
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(tasks):
            for j, b in enumerate(tasks):
                if i == j or a.kind != "full" or b.kind != "full":
                    continue
                if a.k == b.k and a.q.stop == b.q.start:
                    tasks[i] = Task(slice(a.q.start, b.q.stop), a.k, "full")
                elif a.q == b.q and a.k.stop == b.k.start:
                    tasks[i] = Task(a.q, slice(a.k.start, b.k.stop), "full")
                else:
                    continue
                del tasks[j]
                merged = True
                break
            if merged:
                break
    return tasks


def step_tasks(spec: MaskSpec, layout: str, rank: int, source: int, ring_size: int, local_len: int,
               tile_rows: int = TILE_ROWS, split_bands: bool = False) -> list[Task]:
    """The block computations of ``rank`` against the K/V shard of ``source``.

    Plain zigzag causal gives the three cases of ring attention's load balancing:
    source == rank: the causal local pair; source < rank: all queries against the first
    half of K/V; source > rank: the second half of the queries against all of K/V.

    ``split_bands``: cut masked tiles into causal + full blocks and narrow masked strips
    (``_split_tile``). Used on GPUs, where a masked tile runs on a slower kernel than the
    fused unmasked ones; on CPU the fused kernel takes a mask at nearly its unmasked speed
    and the extra calls cost about what they save (sliding window N/8 at N=8192: 0.47 vs
    0.46 of causal at ring 2, 0.32 vs 0.37 at ring 4, one run each).
    """
    total = local_len * ring_size
    q_segs = segments(layout, rank, ring_size, local_len, spec.cu_seqlens)
    k_segs = segments(layout, source, ring_size, local_len, spec.cu_seqlens)
    tasks: list[Task] = []
    for qs in q_segs:
        pos = torch.arange(qs.global_start, qs.global_start + qs.length)
        lo, hi = spec.bounds(pos, total)
        for ks in k_segs:
            if ks.doc == qs.doc and ks.length and qs.length:  # documents never see each other
                tasks += _pair_tasks(qs, ks, lo, hi, spec, tile_rows, split_bands)
    return _merge_full(tasks)
