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
CUDA flash kernel, fp16/bf16), ``cuda_cudnn`` (ATen's cuDNN attention, fp16/bf16; chosen on
Hopper and newer, where it is the fastest), ``cuda_efficient`` (ATen's CUDA memory-efficient kernel:
fp32/fp16/bf16, takes an explicit mask, so masked tiles of the CUDA kernels go to it),
``math`` (plain torch, any dtype/device; materialises the (Sq, Sk) scores).
``select_kernel`` picks one.
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
        return _masked_forward(q, k, v, scale=scale, causal=causal, mask=mask)
    # GQA native: the kernel (FlashAttention-2) takes fewer K/V heads than query heads.
    res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _cuda_flash_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    if mask is not None:
        return _masked_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
    sq, sk = q.shape[2], k.shape[2]
    empty = torch.empty(0, dtype=torch.int64, device=q.device)  # philox seed/offset: unused without dropout
    # cum_seq_q/k = None (undefined): a defined tensor there selects the variable-length path.
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, sq, sk, 0.0, causal, empty, empty, scale=scale)


# ----------------------------------------------------------------------------- cuda_cudnn
# ATen's cuDNN attention (fp16/bf16, GQA native). On an H200 (torch 2.11, cuDNN 9) it ran
# fwd+bwd 1.7x faster than ATen's flash kernel (FlashAttention-2), and it is SDPA's own
# default there (benchmarks/bench_cuda.py). Its lse is (B, H, S, 1).
def _cuda_cudnn_forward(q, k, v, *, scale, causal=False, mask=None):
    if mask is not None:
        return _masked_forward(q, k, v, scale=scale, causal=causal, mask=mask)
    res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1].squeeze(-1)


def _cuda_cudnn_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    if mask is not None:
        return _masked_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed/offset: unused without dropout
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.contiguous().unsqueeze(-1), zero, zero, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale)


def _cudnn_ok(q: torch.Tensor) -> bool:
    """Where cuDNN attention was measured and tested: Hopper or newer, fp16/bf16, head dim <= 128."""
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device) >= (9, 0))


# ------------------------------------------------------------------------ cuda_efficient
# ATen's memory-efficient kernel (xFormers' CUTLASS kernel): fp32/fp16/bf16, an additive
# bias for explicit masks. Its lse comes padded to a multiple of 32 rows; the bias needs a
# row stride aligned to 16 elements (the kernel's requirement), so it is cut from a wider buffer.
_LSE_ALIGN = 32


def _efficient_bias(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    sq, sk = mask.shape
    buf = torch.zeros(sq, sk + (-sk % 16), dtype=q.dtype, device=q.device)[:, :sk]
    buf.masked_fill_(~mask, float("-inf"))
    return buf.expand(q.shape[0], q.shape[1], sq, sk)


def _cuda_efficient_forward(q, k, v, *, scale, causal=False, mask=None):
    g = q.shape[1] // k.shape[1]
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q, _expand_kv(k, g), _expand_kv(v, g), _efficient_bias(mask, q), True, 0.0, causal, scale=scale)
    lse = lse[..., :q.shape[2]]
    if mask is not None:
        empty = ~mask.any(-1)  # (Sq,) rows with no allowed key: out = 0, lse = -inf
        if bool(empty.any()):
            out = out.masked_fill(empty[:, None], 0.0)
            lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def _cuda_efficient_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    g = q.shape[1] // k.shape[1]
    sq = q.shape[2]
    lse_pad = lse.new_full((*lse.shape[:2], -(-sq // _LSE_ALIGN) * _LSE_ALIGN), float("inf"))
    lse_pad[..., :sq] = lse
    zero = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed/offset: unused without dropout
    # The kernel reads out with a row stride of H * D (the (B, S, H, D) layout its forward writes),
    # whatever out's strides say: hand it that layout.
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, _expand_kv(k, g), _expand_kv(v, g), _efficient_bias(mask, q), out, lse_pad, zero, zero,
        0.0, [True, True, True, False], causal, scale=scale)
    return dq, _reduce_kv(dk, g), _reduce_kv(dv, g)


def _efficient_ok(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and q.dtype in (torch.float32, torch.float16, torch.bfloat16) \
        and q.shape[-1] % 8 == 0


def _masked_forward(q, k, v, **kw):
    return (_cuda_efficient_forward if _efficient_ok(q) else _math_forward)(q, k, v, **kw)


def _masked_backward(dout, q, k, v, out, lse, **kw):
    return (_cuda_efficient_backward if _efficient_ok(q) else _math_backward)(dout, q, k, v, out, lse, **kw)


# ---------------------------------------------------------------------------- flash_attn
# flash-attn >= 2.6 (Dao 2023): its private forward/backward take the final lse, as the
# ring needs; layout (B, S, H, D); GQA native. Explicit masks go to the math kernel.
def _flash_attn_forward(q, k, v, *, scale, causal=False, mask=None):
    if mask is not None:
        return _masked_forward(q, k, v, scale=scale, causal=causal, mask=mask)
    from flash_attn.flash_attn_interface import _flash_attn_forward as fa_fwd

    out, lse, _, _ = fa_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, scale, causal,
                            -1, -1, 0.0, None, False)
    return out.transpose(1, 2), lse


def _flash_attn_backward(dout, q, k, v, out, lse, *, scale, causal=False, mask=None):
    if mask is not None:
        return _masked_backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
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
    "cuda_efficient": Kernel(_cuda_efficient_forward, _cuda_efficient_backward),
    "cuda_cudnn": Kernel(_cuda_cudnn_forward, _cuda_cudnn_backward),
    "flash_attn": Kernel(_flash_attn_forward, _flash_attn_backward),
    "math": Kernel(_math_forward, _math_backward),
}


def select_kernel(q: torch.Tensor, name: str | Kernel | None = None) -> Kernel:
    """Pick the block kernel for ``q``'s device and dtype, or the one named (a ``Kernel`` is used as given).

    Raises:
        ValueError: ``name`` is not one of ``KERNELS``, or does not fit the tensors.
    """
    if isinstance(name, Kernel):
        return name
    if name is None or name == "auto":
        if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            name = "cpu_flash"
        elif _cudnn_ok(q):
            name = "cuda_cudnn"
        elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            name = "flash_attn" if _has_flash_attn() else "cuda_flash"
        elif _efficient_ok(q):
            name = "cuda_efficient"
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
    if name == "cuda_cudnn" and not _cudnn_ok(q):
        raise ValueError(f"kernel='cuda_cudnn' needs fp16/bf16 CUDA tensors on a Hopper-or-newer GPU with a head "
                         f"dim that is a multiple of 8 and <= 128, got {q.dtype} on {q.device}, head dim "
                         f"{q.shape[-1]}; use kernel='auto'")
    if name == "cuda_efficient" and not _efficient_ok(q):
        raise ValueError(f"kernel='cuda_efficient' needs fp32/fp16/bf16 CUDA tensors with a head dim that is a "
                         f"multiple of 8, got {q.dtype} on {q.device}, head dim {q.shape[-1]}; use kernel='auto'")
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
    # out += w * (out_b - out), in place: block_out is the kernel's fresh output (or its fp32 copy),
    # so it serves as the one temporary.
    delta = block_out.to(out.dtype)
    out.add_(delta.sub_(out).mul_(w))
    lse.copy_(torch.logaddexp(lse, block_lse))
