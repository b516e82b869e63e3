"""Block kernels: attention of one query block against one key/value block.

Every kernel returns ``(out, lse)``: ``out`` in the query's dtype, ``lse`` (the
log-sum-exp of the scaled scores per query row) in fp32 (fp64 for fp64 inputs), and has
a backward that takes the FINAL ``out``/``lse`` of the whole ring, so that a block's
gradient is exact without storing its probabilities (FlashAttention-2, Dao 2023, sec. 3.1).

Shapes: q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA handled inside).
``mask`` is an optional bool (Sq, Sk) tensor, True where a key may be attended; rows
with no True get ``lse = -inf`` and ``out = 0``. ``causal`` is the top-left aligned
causal mask (query i sees keys 0..i), used for diagonal blocks.

Kernels (``KERNELS``): ``cpu_flash`` (ATen's fused CPU flash kernel), ``flash_attn``
(the flash-attn package, fp16/bf16 CUDA, chosen when importable), ``cuda_flash`` (ATen's
CUDA flash kernel, fp16/bf16), ``math`` (plain torch, any
dtype/device; materialises the (Sq, Sk) scores). ``select_kernel`` picks one.
This module knows nothing about process groups.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

aten = torch.ops.aten


class Kernel(NamedTuple):
    forward: Callable  # (q, k, v, *, scale, causal, mask) -> (out, lse)
    backward: Callable  # (dout, q, k, v, out, lse, *, scale, causal, mask) -> (dq, dk, dv)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """bool allowed-mask -> additive float mask in ``dtype`` (the fused kernels want that)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


# ----------------------------------------------------------------------------- cpu_flash
def _cpu_flash_forward(q, k, v, *, scale, causal=False, mask=None):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)
    if mask is not None:
        # The fused kernel reports lse = 0 (not -inf) for rows with no allowed key.
        empty = ~mask.any(-1)  # (Sq,)
        if bool(empty.any()):
            lse.masked_fill_(empty, float("-inf"))
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)


# ---------------------------------------------------------------------------- cuda_flash
def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # (B, Hkv, S, D) -> (B, Hkv * groups, S, D): head h of q uses kv head h // groups.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    # Sum the gradients of the query heads that share one kv head.
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(2)


def _cuda_flash_forward(q, k, v, *, scale, causal=False, mask=None):
    if mask is not None:  # ATen's CUDA flash kernel takes no explicit mask.
        return _math_forward(q, k, v, scale=scale, causal=causal, mask=mask)
    g = q.shape[1] // k.shape[1]
    res = aten._scaled_dot_product_flash_attention(
        q, _expand_kv(k, g), _expand_kv(v, g), 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _cuda_flash_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    if mask is not None:
        return _math_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
    g = q.shape[1] // k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dout, q, _expand_kv(k, g), _expand_kv(v, g), out, lse.contiguous(), empty, empty, sq, sk,
        0.0, causal, empty, empty, scale=scale)
    return dq, _reduce_kv(dk, g), _reduce_kv(dv, g)


# ---------------------------------------------------------------------------- flash_attn
# flash-attn >= 2.6 (Dao 2023): its private forward/backward take the final lse, as the
# ring needs; layout (B, S, H, D); GQA native. Explicit masks go to the math kernel.
def _flash_attn_forward(q, k, v, *, scale, causal=False, mask=None):
    if mask is not None:
        return _math_forward(q, k, v, scale=scale, causal=causal, mask=mask)
    from flash_attn.flash_attn_interface import _flash_attn_forward as fa_fwd

    out, lse, _, _ = fa_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale, causal,
                            -1, -1, 0.0, None, False)
    return out.transpose(1, 2), lse


def _flash_attn_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    if mask is not None:
        return _math_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
    from flash_attn.flash_attn_interface import _flash_attn_backward as fa_bwd

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    fa_bwd(dout.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse.contiguous(), dq, dk, dv, 0.0, scale, causal,
           -1, -1, 0.0, None, False)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------- math
def _scores(q, k, scale, causal, mask):
    """Masked scaled scores in the compute dtype: (B, Hkv, G, Sq, Sk)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    ct = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(ct).view(b, hkv, hq // hkv, sq, d)
    s = torch.matmul(qg, k.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril_()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, qg


def _math_forward(q, k, v, *, scale, causal=False, mask=None):
    b, hq, sq, d = q.shape
    s, _ = _scores(q, k, scale, causal, mask)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no key
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))  # (B, Hkv, G, Sq, D)
    return out.reshape(b, hq, sq, d).to(q.dtype), lse.reshape(b, hq, sq)


def _math_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    s, qg = _scores(q, k, scale, causal, mask)
    ct = s.dtype
    # The ring passes lse = +inf for rows that saw no key at all, so p = 0 there.
    p = torch.exp(s - lse.to(ct).view(b, hkv, hq // hkv, sq, 1))  # (B, Hkv, G, Sq, Sk)
    do = dout.to(ct).view(b, hkv, hq // hkv, sq, d)
    o = out.to(ct).view(b, hkv, hq // hkv, sq, d)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    dp = torch.matmul(do, v.to(ct).unsqueeze(2).transpose(-1, -2))
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(ct).unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qg).sum(2) * scale
    return dq.reshape(b, hq, sq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


KERNELS: dict[str, Kernel] = {
    "cpu_flash": Kernel(_cpu_flash_forward, _cpu_flash_backward),
    "cuda_flash": Kernel(_cuda_flash_forward, _cuda_flash_backward),
    "flash_attn": Kernel(_flash_attn_forward, _flash_attn_backward),
    "math": Kernel(_math_forward, _math_backward),
}


def select_kernel(q: torch.Tensor, name: str | None = None) -> Kernel:
    """Pick the block kernel for ``q``'s device and dtype, or the one named.

    Raises:
        ValueError: ``name`` is not one of ``KERNELS``, or does not fit the tensors.
    """
    if name is None or name == "auto":
        if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            name = "cpu_flash"
        elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            name = "flash_attn" if _has_flash_attn() else "cuda_flash"
        else:
            name = "math"
    if name not in KERNELS:
        raise ValueError(f"kernel={name!r} is not known; choose one of {['auto', *KERNELS]}")
    if name == "cpu_flash" and q.device.type != "cpu":
        raise ValueError(f"kernel='cpu_flash' needs CPU tensors, got {q.device}; use kernel='auto'")
    if name in ("cuda_flash", "flash_attn") and (q.device.type != "cuda" or
                                                 q.dtype not in (torch.float16, torch.bfloat16)):
        raise ValueError(f"kernel={name!r} needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}; "
                         "use kernel='auto'")
    return KERNELS[name]


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge a block's (out, lse) into the running fp32 accumulators, in place.

    Stable form: ``out -= sigmoid(lse_b - lse) * (out - out_b)``, ``lse = logaddexp(lse, lse_b)``.
    Rows where both lse are -inf (no key seen yet, and none in this block) stay (0, -inf)
    instead of producing NaN.

    Shapes: out (B, H, S, D) fp32; lse (B, H, S) fp32; block_* the same rows.
    """
    diff = block_lse - lse
    diff = torch.where(torch.isnan(diff), float("-inf"), diff)  # -inf - -inf: the block adds nothing
    w = torch.sigmoid(diff).unsqueeze(-1)
    out.sub_(w * (out - block_out.to(out.dtype)))
    lse.copy_(torch.logaddexp(lse, block_lse))
