"""The ring loops run as threads of one process (tests/virtual_ring.py) against the fp64
reference, on CPU and, where present, one GPU: this is how the CUDA kernels are checked
inside multi-step rings on a single GPU. Real multi-process rings are in test_ring_core.

Tolerances: fp32 within 2x single-process SDPA's fp32 error + 1e-5 (CPU: 2e-5 absolute,
as test_ring_core, since fp32 flash blocks agree with fp64 to ~1e-6); bf16 within 2x
single-process bf16 SDPA's error (same mask) + 1e-3: SDPA's rounding is the scale of what
a bf16 kernel may differ by, and the merges accumulate in fp32.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import hf_ring_attention as hra
from reference import allowed_mask, reference_attention
from virtual_ring import run_virtual_ring

CASES = [  # (world, layout, causal, window, docs)
    (2, "zigzag", True, None, False),
    (4, "zigzag", True, None, False),
    (3, "contiguous", False, None, False),
    (4, "zigzag", True, 40, False),
    (4, "zigzag", True, 100, False),  # window wider than a chunk's tile: split into causal/full/strips on GPU
    (2, "zigzag", True, None, True),
    (4, "zigzag_docs", True, None, True),
]


def _docs(n, world, layout):
    if layout == "zigzag_docs":
        u = 2 * world
        return [0, 3 * u, n - 5 * u, n]
    return [0, 37, n - 50, n]


KERNELS = [("cpu", None), ("cpu", "split")]  # "split": the GPU plan (split_bands) on the CPU kernels
if torch.cuda.is_available():  # auto, and every CUDA kernel inside real multi-step rings
    KERNELS += [("cuda", None), ("cuda", "cuda_flash"), ("cuda", "cuda_efficient")]
    if torch.cuda.get_device_capability() >= (9, 0):
        KERNELS.append(("cuda", "cuda_cudnn"))


def _params():
    """Every (device, kernel, dtype, case) that means something: fp16/bf16-only kernels run in
    bf16 only, the split plan only where there is a window, and CPU bf16 only at ring 2 (larger
    CPU bf16 rings are in test_ring_core)."""
    out = []
    for (device, kernel), dtype, case in itertools.product(KERNELS, (torch.float32, torch.bfloat16), CASES):
        world, window = case[0], case[3]
        if kernel in ("cuda_flash", "cuda_cudnn") and dtype == torch.float32:
            continue
        if kernel == "split" and window is None:
            continue
        if device == "cpu" and dtype == torch.bfloat16 and world > 2:
            continue
        out.append(pytest.param(device, kernel, dtype, *case, id=f"{device}-{kernel}-{str(dtype)[6:]}-{'-'.join(map(str, case))}"))
    return out


@pytest.mark.parametrize("device,kernel,dtype,world,layout,causal,window,docs", _params())
def test_virtual_ring_matches_reference(device, kernel, dtype, world, layout, causal, window, docs):
    torch.manual_seed(0)
    n, d = 2 * world * 48, 64
    q, k, v = (torch.randn(2, h, n, d, dtype=torch.float64) for h in (8, 2, 2))
    do = torch.randn(2, 8, n, d, dtype=torch.float64)
    cu = _docs(n, world, layout) if docs else None
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*full, causal=causal, window=window, cu_seqlens=cu)
    ref.backward(do)
    refs = [ref.detach()] + [t.grad for t in full]

    if layout == "contiguous":
        shard = lambda x, r: x.chunk(world, dim=2)[r]  # noqa: E731
    elif layout == "zigzag_docs":
        shard = lambda x, r: torch.cat([hra.zigzag_shard(x[:, :, a:b], dim=2, rank=r, ring_size=world)  # noqa: E731
                                        for a, b in zip(cu, cu[1:])], dim=2)
    else:
        shard = lambda x, r: hra.zigzag_shard(x, dim=2, rank=r, ring_size=world)  # noqa: E731
    put = lambda x, r: shard(x, r).to(device, dtype).contiguous()  # noqa: E731
    force = {}
    if kernel == "split":
        force, kernel = dict(split_bands=True, tile_rows=16), None  # 16-row tiles: bands split at these sizes
    res = run_virtual_ring([put(q, r) for r in range(world)], [put(k, r) for r in range(world)],
                           [put(v, r) for r in range(world)], [put(do, r) for r in range(world)],
                           layout=layout, causal=causal, window=window, cu_seqlens=cu, kernel=kernel, **force)
    errs = [max((res[r][i].double().cpu() - shard(refs[i], r)).abs().max().item() for r in range(world))
            for i in range(4)]

    mask = allowed_mask(n, causal=causal, window=window, cu_seqlens=cu).to(device)
    sd = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    so = F.scaled_dot_product_attention(*sd, attn_mask=mask, enable_gqa=True)
    so.backward(do.to(device, dtype))
    base = [(a.double().cpu() - r).abs().max().item() for a, r in zip([so.detach()] + [t.grad for t in sd], refs)]
    slack = 1e-3 if dtype == torch.bfloat16 else (1e-5 if device == "cuda" else 2e-5)
    for name, e, b in zip(("out", "dq", "dk", "dv"), errs, base):
        assert e <= 2 * b + slack, (name, errs, base)
