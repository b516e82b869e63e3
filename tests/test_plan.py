"""The planner alone: over every rank and ring step, the block tasks cover each allowed
(query, key) pair of the full sequence exactly once and no other pair (exact, no tolerance).
The ring's exactness rests on this; the kernels and merges are tested elsewhere."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_ring_attention.plan import MaskSpec, segments, step_tasks
from reference import allowed_mask


def _global_index(layout, rank, world, local_len, cu):
    idx = torch.empty(local_len, dtype=torch.long)
    for s in segments(layout, rank, world, local_len, cu):
        idx[s.local_start:s.local_start + s.length] = torch.arange(s.global_start, s.global_start + s.length)
    return idx


def coverage(spec, layout, world, n, tile_rows, split_bands=False):
    """(N, N) int: how many tasks of the whole ring compute each (query, key) pair."""
    local = n // world
    cnt = torch.zeros(n, n, dtype=torch.int32)
    for r, src in itertools.product(range(world), range(world)):
        qi, ki = _global_index(layout, r, world, local, spec.cu_seqlens), \
            _global_index(layout, src, world, local, spec.cu_seqlens)
        for t in step_tasks(spec, layout, r, src, world, local, tile_rows=tile_rows, split_bands=split_bands):
            nq, nk = t.q.stop - t.q.start, t.k.stop - t.k.start
            if t.kind == "full":
                m = torch.ones(nq, nk, dtype=torch.bool)
            elif t.kind == "causal":
                assert nq == nk, t
                m = torch.ones(nq, nk, dtype=torch.bool).tril_()
            else:
                m = t.mask()
            rows, cols = qi[t.q][:, None].expand(nq, nk)[m], ki[t.k][None, :].expand(nq, nk)[m]
            cnt.index_put_((rows, cols), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
    return cnt


CASES = [  # (world, layout, causal, window, docs, tile_rows)
    (1, "zigzag", True, None, None, 512),
    (2, "zigzag", True, None, None, 16),
    (3, "contiguous", False, None, None, 16),
    (4, "contiguous", True, None, None, 16),
    (2, "zigzag", True, 5, None, 16),      # window narrower than a tile
    (2, "zigzag", True, 40, None, 16),     # window wider than a tile: full + causal + masked pieces
    (4, "zigzag", True, 40, None, 16),
    (4, "zigzag", True, 24, None, 7),      # tiles that do not divide the chunks
    (3, "zigzag", True, 100, None, 16),    # window wider than a chunk
    (2, "zigzag", True, None, (0, 37, 150, 192), 16),
    (2, "zigzag", True, 30, (0, 37, 150, 192), 16),
    (4, "zigzag_docs", True, None, (0, 24, 120, 192), 16),
    (4, "zigzag_docs", True, 20, (0, 24, 120, 192), 8),
]


@pytest.mark.parametrize("split_bands", [False, True])
@pytest.mark.parametrize("world,layout,causal,window,docs,tile_rows", CASES)
def test_tasks_cover_each_allowed_pair_exactly_once(world, layout, causal, window, docs, tile_rows, split_bands):
    n = 192
    spec = MaskSpec(causal=causal, window=window, cu_seqlens=docs)
    cnt = coverage(spec, layout, world, n, tile_rows, split_bands)
    want = allowed_mask(n, causal=causal, window=window, cu_seqlens=docs).to(torch.int32)
    bad = (cnt != want).nonzero()
    assert bad.numel() == 0, f"{len(bad)} pairs wrong, first (q, k, count, allowed): " + \
        str([(int(i), int(j), int(cnt[i, j]), int(want[i, j])) for i, j in bad[:5]])


def test_split_bands_leave_only_narrow_masked_strips():
    # Sliding window 1024 over 512-row tiles (ring 2, N = 8192): the split plan masks about a third
    # of what the unsplit plan masks, and computes no more pairs in all.
    spec = MaskSpec(causal=True, window=1024)

    def area(split):
        out = {}
        for r, src in itertools.product(range(2), range(2)):
            for t in step_tasks(spec, "zigzag", r, src, 2, 4096, split_bands=split):
                out[t.kind] = out.get(t.kind, 0) + (t.q.stop - t.q.start) * (t.k.stop - t.k.start)
        return out
    plain, split = area(False), area(True)
    assert split["masked"] < 0.4 * plain["masked"], (plain, split)
    assert sum(split.values()) <= sum(plain.values()), (plain, split)
