"""Ring attention core against an unsharded single-process reference (CPU, gloo).

Tolerances:
- fp32 vs an fp64 reference: 2e-5 absolute on O(1) values. fp32's unit roundoff is 6e-8;
  a softmax over <= 96 keys and the LSE merge over <= 4 blocks stay within a few hundred
  ulps (we measure <= 1.5e-6), while any masking or merge mistake shows up as O(0.1).
- fp64: 1e-10 (measured ~2e-15).
- bf16: the ring's error against the fp64 reference must be at most twice that of
  single-process bf16 SDPA (PyTorch's own kernel) against the same reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_ring_attention as hra
from dist_utils import run_ranks
from reference import reference_attention

CASES = [
    # (batch, q heads, kv heads, head dim, layout, causal, window, docs)
    (1, 4, 4, 16, "zigzag", True, None, None),
    (2, 4, 2, 32, "zigzag", True, None, None),
    (2, 6, 2, 16, "contiguous", False, None, None),
    (1, 4, 1, 32, "contiguous", True, None, None),
    (2, 4, 2, 16, "zigzag", True, 7, None),
    (1, 4, 2, 16, "zigzag", True, None, "docs"),
    (1, 4, 2, 16, "zigzag", True, 9, "docs"),
    (1, 4, 2, 16, "contiguous", False, None, "docs"),
    (2, 4, 2, 16, "zigzag_docs", True, None, "docs"),
    (1, 4, 2, 16, "zigzag_docs", True, 9, "docs"),
]


def _docs(n):
    # Lengths 5, (n - 12) and two short ones: some shorter than a chunk, one spanning ranks.
    return [0, 5, n - 7, n - 6, n]


def _docs_balanced(n, world):
    # Lengths 2C, N - 6C, 4C: multiples of 2C, as zigzag_docs needs (shard_batch pads to that).
    return [0, 2 * world, n - 4 * world, n]


def _shard(x, layout, rank, world, cu=None):
    if layout == "zigzag_docs":
        return hra.sharding.document_zigzag_shard(x, dim=2, rank=rank, ring_size=world, cu_seqlens=cu)
    if layout == "zigzag":
        return hra.zigzag_shard(x, dim=2, rank=rank, ring_size=world)
    return x.chunk(world, dim=2)[rank].contiguous()


def _errors(rank, world, case, dtype, kernel, chunk, options=None):
    b, hq, hkv, d, layout, causal, window, docs = case
    n = 2 * world * chunk
    cu = (_docs_balanced(n, world) if layout == "zigzag_docs" else _docs(n)) if docs else None
    g = torch.Generator().manual_seed(1234)  # same full tensors on every rank
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*full, causal=causal, window=window, cu_seqlens=cu)
    ref.backward(dout)
    ref_all = [ref.detach()] + [t.grad for t in full]

    local = [_shard(t, layout, rank, world, cu).to(dtype).requires_grad_() for t in (q, k, v)]
    out = hra.ring_attention(*local, causal=causal, layout=layout, sliding_window=window, cu_seqlens=cu,
                             kernel=kernel, options=options)
    assert out.dtype == dtype and out.shape == local[0].shape
    out.backward(_shard(dout, layout, rank, world, cu).to(dtype))
    got = [out.detach()] + [t.grad for t in local]
    errs = [(a.double() - _shard(r, layout, rank, world, cu)).abs().max().item() for a, r in zip(got, ref_all)]

    base = None
    if dtype == torch.bfloat16 and not docs and window is None:
        # Single-process bf16 SDPA on the full sequence: the error budget for bf16.
        sd = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        so = F.scaled_dot_product_attention(*sd, is_causal=causal, enable_gqa=hq != hkv)
        so.backward(dout.to(dtype))
        base = [(a.double() - r).abs().max().item()
                for a, r in zip([so.detach()] + [t.grad for t in sd], ref_all)]
    return errs, base


def _check_all(rank, world, dtype, kernel, chunk, bwd_rows=None):
    # bwd_rows = (query rows, key rows): exercise the backward's split of every block into pieces
    options = None if bwd_rows is None else hra.RingOptions(bwd_q_rows=bwd_rows[0], bwd_kv_rows=bwd_rows[1])
    report = []
    for case in CASES:
        errs, base = _errors(rank, world, case, dtype, kernel, chunk, options)
        report.append((case, errs, base))
    return report


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fp32_matches_fp64_reference(world):
    for rank_report in run_ranks(_check_all, world, torch.float32, None, 12):
        for case, errs, _ in rank_report:
            assert max(errs) < 2e-5, f"{case}: max |err| of (out, dq, dk, dv) = {errs}"


@pytest.mark.parametrize("rows", [(5, 7), (None, 3)])
def test_backward_in_row_pieces_is_exact(rows):
    # Blocks of 12-24 rows cut into pieces of 5 query x 7 key rows, or 3 key rows: causal squares
    # with full blocks left of them, masked tiles' columns, pieces whose mask allows nothing.
    for rank_report in run_ranks(_check_all, 2, torch.float32, None, 12, rows):
        for case, errs, _ in rank_report:
            assert max(errs) < 2e-5, f"{case}: {errs}"


@pytest.mark.parametrize("world", [2, 3])
def test_fp64_and_math_kernel_exact(world):
    for kernel in ("cpu_flash", "math"):
        for rank_report in run_ranks(_check_all, world, torch.float64, kernel, 8):
            for case, errs, _ in rank_report:
                assert max(errs) < 1e-10, f"{kernel} {case}: {errs}"


@pytest.mark.parametrize("world", [2, 4])
def test_bf16_error_within_twice_sdpa(world):
    for rank_report in run_ranks(_check_all, world, torch.bfloat16, None, 16):
        for case, errs, base in rank_report:
            # Loose absolute sanity bound for every case (bf16 has 8 mantissa bits).
            assert max(errs) < 0.1, f"{case}: {errs}"
            if base is not None:
                for name, e, s in zip(("out", "dq", "dk", "dv"), errs, base):
                    assert e <= 2 * s, f"{case} {name}: ring bf16 error {e:.3g} > 2 x SDPA bf16 error {s:.3g}"


def test_ring_size_one_without_process_group_is_causal_attention():
    q, k, v = torch.randn(2, 4, 32, 8), torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(hra.ring_attention(q, k, v), ref, atol=1e-5, rtol=1e-5)


def _different_lengths(rank, world):
    q = torch.randn(1, 2, 8 + 4 * rank, 8)
    hra.ring_attention(q, q, q)


def test_local_lengths_that_differ_across_ranks_raise():
    with pytest.raises(AssertionError, match="disagree on shape"):
        run_ranks(_different_lengths, 2, timeout=120)


@pytest.mark.parametrize("kwargs, args, match", [
    ({}, ((1, 3, 8, 8), (1, 2, 8, 8)), "multiple of key/value heads"),
    ({"layout": "zigzag"}, ((1, 2, 7, 8), (1, 2, 7, 8)), "must be even"),
    ({"layout": "striped"}, ((1, 2, 8, 8), (1, 2, 8, 8)), "choose one of"),
    ({"kernel": "triton"}, ((1, 2, 8, 8), (1, 2, 8, 8)), "choose one of"),
    ({"sliding_window": 4, "causal": False}, ((1, 2, 8, 8), (1, 2, 8, 8)), "needs causal=True"),
    ({"cu_seqlens": [0, 5, 3, 8]}, ((1, 2, 8, 8), (1, 2, 8, 8)), "increase strictly"),
    # floats would truncate silently (1.7 -> 1); one set of boundaries is 1-D
    ({"cu_seqlens": torch.tensor([0.0, 1.7, 8.0])}, ((1, 2, 8, 8), (1, 2, 8, 8)), r"1-D torch.float32 tensor of shape \(3,\)"),
    ({"cu_seqlens": torch.tensor([[0, 4, 8]])}, ((1, 2, 8, 8), (1, 2, 8, 8)), r"2-D torch.int64 tensor of shape \(1, 3\)"),
    ({"cu_seqlens": [0, 1.7, 8]}, ((1, 2, 8, 8), (1, 2, 8, 8)), "must hold ints.*1.7"),
])
def test_bad_input_raises_clear_errors(kwargs, args, match):
    qs, ks = args
    with pytest.raises(ValueError, match=match):
        hra.ring_attention(torch.randn(qs), torch.randn(ks), torch.randn(ks), **kwargs)


def test_mixed_dtypes_raise():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="different dtypes"):
        hra.ring_attention(q, q.double(), q.double())


def _roundtrip(rank, world):
    x = torch.arange(2 * 3 * world * 4).view(2, 3, 2 * world * 2)
    y = hra.zigzag_unshard(hra.zigzag_shard(x, dim=2, rank=rank, ring_size=world), dim=2)
    assert torch.equal(x, y)
    return hra.zigzag_shard(x, dim=2, rank=rank, ring_size=world)[0, 0].tolist()


def test_zigzag_shard_roundtrip_and_layout():
    shards = run_ranks(_roundtrip, 3)
    # 12 positions, 6 chunks of 2: rank r holds chunks r and 5 - r.
    assert shards == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="multiple of 2 \\* ring size"):
        hra.zigzag_shard(torch.zeros(10), dim=0, rank=0, ring_size=3)
