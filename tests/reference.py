"""Unsharded single-process attention, written independently of the package's planner."""

from __future__ import annotations

import torch


def allowed_mask(n: int, *, causal: bool = True, window: int | None = None, cu_seqlens=None) -> torch.Tensor:
    """(N, N) bool: query i may attend key j."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    m = torch.ones(n, n, dtype=torch.bool)
    if causal:
        m &= j <= i
    if window is not None:
        m &= (i - j) < window
    if cu_seqlens is not None:
        doc = torch.zeros(n, dtype=torch.long)
        for b in list(cu_seqlens)[1:-1]:
            doc[int(b):] += 1
        m &= doc[:, None] == doc[None, :]
    return m


def reference_attention(q, k, v, *, causal=True, window=None, cu_seqlens=None, scale=None):
    """Plain softmax attention on the full sequence. q (B, Hq, N, D); k, v (B, Hkv, N, D)."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed_mask(q.shape[2], causal=causal, window=window, cu_seqlens=cu_seqlens), float("-inf"))
    return torch.softmax(s, dim=-1) @ v
