"""Causal-LM loss without the (S_local x vocab) logits: the LM head + cross-entropy in row chunks.

``chunked_causal_lm_loss(hidden, weight, targets, num_items_in_batch=...)`` equals transformers'
``ForCausalLMLoss`` on already shifted targets (``transformers/loss/loss_utils.py``): the sum of
the token cross-entropies (fp32 logits, ignore_index -100) divided by ``num_items_in_batch``, or
the mean over valid targets without it. Only ``chunk_size`` valid rows have logits at a time.

The torch path computes each chunk's gradients in the forward pass (as liger-kernel's fused
linear cross-entropy does): the chunk's logits become softmax - onehot in place, then
dh = dlogits W and dW += dlogits^T h. Backward only scales the stored dh (N, H) and dW (V, H)
by the incoming gradient. Measured against recomputing each chunk in backward (checkpoint): no
second logits matmul (3 instead of 4 vocab-sized matmuls) and one (chunk, vocab) fp32 buffer
instead of about three. On CUDA, liger-kernel's fused kernel runs instead when installed.

``install_chunked_loss(model, chunk_size)`` makes a transformers ``*ForCausalLM`` use it whenever
labels are passed (``apply_ring_attention`` calls it): see ``loss_patch.py``.
"""

from __future__ import annotations

import importlib.util

import torch

from .sharding import IGNORE_INDEX
LOSS_IMPLS = ("auto", "torch", "liger")


def check_chunk_size(chunk_size, *, name: str = "loss_chunk_size", allow_none: bool = True) -> None:
    """Raise ValueError unless ``chunk_size`` is a positive int (or None where allowed)."""
    if chunk_size is None and allow_none:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}={chunk_size!r} must be a positive int (rows of hidden states per LM-head + "
                         "cross-entropy chunk)" + (", or None for transformers' own loss (and logits)"
                                                   if allow_none else ""))


def check_impl(impl) -> None:
    """Raise ValueError unless ``impl`` is one of ``LOSS_IMPLS``."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl={impl!r} is not one of {LOSS_IMPLS}: 'auto' (liger-kernel on CUDA when "
                         "installed, else torch), 'torch' (chunked, any device), 'liger' (liger-kernel, CUDA)")


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32 ``acc`` without rounding ``a @ b`` to 16 bits first."""
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # torch >= 2.8 on CUDA
            return
        except TypeError:
            pass
    acc.addmm_(a.float(), b.float())


def _chunk(hidden, targets, rows, w, b, scale, softcap, dtype, dh, dw, db) -> torch.Tensor:
    """Summed CE (fp64) of ``rows``; adds their gradients into dh / dw / db (those not None)."""
    h = hidden.index_select(0, rows).to(dtype)  # (c, H)
    y = targets.index_select(0, rows).unsqueeze(1)  # (c, 1)
    z = (h @ w.t() if b is None else torch.addmm(b, h, w.t())).float()  # (c, V) logits, fp32 as HF
    tanh = None
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:  # Gemma 2/3: cap * tanh(z / cap)
        tanh = z.div_(softcap).tanh_()
        z = tanh * softcap
    picked = z.gather(1, y).squeeze(1)  # (c,) target logits
    top = z.amax(dim=1, keepdim=True)  # (c, 1)
    probs = z.sub_(top).exp_()  # (c, V) in place: exp(z - max)
    norm = probs.sum(dim=1, keepdim=True)  # (c, 1)
    nll = (top.squeeze(1) + norm.log().squeeze(1) - picked).sum(dtype=torch.float64)
    if dh is None and dw is None and db is None:
        return nll
    dz = probs.div_(norm)  # softmax, then d(CE)/dz = softmax - onehot
    dz.scatter_add_(1, y, torch.full_like(picked, -1.0).unsqueeze(1))
    if tanh is not None:
        dz.mul_(tanh.square_().neg_().add_(1.0))  # d(cap tanh(z/cap))/dz = 1 - tanh^2
    if scale != 1.0:
        dz.mul_(scale)
    if db is not None:
        db += dz.sum(dim=0)
    g = dz.to(dtype)  # (c, V): the backward matmuls run in the forward's dtype, as autograd's would
    if dh is not None:
        dh.index_copy_(0, rows, (g @ w).to(dh.dtype))
    if dw is not None:
        _addmm_fp32(dw, g.t(), h)
    return nll


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over valid rows of CE(f(h W^T + b), y), f = softcap(scale * z); gradients made in forward.

    Inputs: hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with -100 ignored.
    Returns the fp32 sum (a 0-dim tensor). Differentiable once (see backward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, softcap, dtype, needs):
        need_h, need_w, need_b = needs
        rows_all = torch.nonzero(targets != IGNORE_INDEX).flatten()  # (T,) valid rows only
        dh = torch.zeros_like(hidden) if need_h else None  # (N, H)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V, H)
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, rows_all.numel(), chunk_size):
            # One function call per chunk: its (chunk, V) buffers are freed before the next chunk's exist.
            total += _chunk(hidden, targets, rows_all[start:start + chunk_size], w, b, scale, softcap, dtype,
                            dh, dw, db)
        ctx.grads = (dh, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("the chunked LM-head loss computes its gradients in the forward pass and can be "
                               "back-propagated once per forward (no retain_graph=True second pass); use "
                               "apply_ring_attention(..., loss_chunk_size=None) for transformers' loss")
        dh, dw, db = ctx.grads
        ctx.grads = None  # release them as they go to autograd (no second V x H copy)
        w_dtype, b_dtype = ctx.dtypes
        if dh is not None:
            dh = dh.mul_(grad_total.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad_total).to(w_dtype)
        if db is not None:
            db = db.mul_(grad_total).to(b_dtype)
        return dh, dw, db, None, None, None, None, None, None


def _liger_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and importlib.util.find_spec("liger_kernel") is not None)


def _liger_sum(hidden, weight, bias, targets, scale, softcap, dtype) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy, summed (fp32). The scale is folded into hidden."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h = hidden.to(dtype) if scale == 1.0 else (hidden * scale).to(dtype)
    out = liger_fused_linear_cross_entropy(input=h, weight=weight.to(dtype), target=targets,
                                           bias=None if bias is None else bias.to(dtype),
                                           ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
    out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return out.float()


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: torch.Tensor | None = None, num_items_in_batch=None, chunk_size: int = 4096,
                           logit_scale: float = 1.0, softcap: float | None = None,
                           impl: str = "auto") -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of ``lm_head(hidden)`` on shifted targets, without full logits.

    Logits are ``softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (plain
    ``hidden @ weight.T`` by default), computed in the autocast dtype when autocast is on (else
    in hidden's dtype) and upcast to fp32 for the cross-entropy, as transformers does.

    Args:
        hidden: (..., H) the LM head's input (e.g. (B, S_local, H)).
        weight: (V, H) the LM head's weight (pass the module's own parameter so a tie to the
            input embedding receives the gradient).
        targets: (...) next-token targets, already shifted (``shift_labels``), -100 ignored.
        bias: (V,) or None.
        num_items_in_batch: divisor of the summed loss (tensor or number); None: the mean over
            valid targets (NaN when there is none, as in transformers).
        chunk_size: valid rows per chunk: at most one (chunk_size, V) fp32 logits buffer exists.
        logit_scale, softcap: the model's logit transform (Cohere / Granite scale, Gemma softcap).
        impl: "auto" (liger-kernel on CUDA when installed and gradients are wanted, else
            "torch"), "torch" or "liger".

    Returns:
        The loss, a 0-dim fp32 tensor (float64 when ``num_items_in_batch`` is a float64 tensor,
        by the same type promotion as transformers' ``loss / num_items_in_batch``).

    Raises:
        ValueError: shapes that do not match, a bad chunk size or impl, "liger" where it cannot run.
    """
    check_chunk_size(chunk_size, name="chunk_size", allow_none=False)
    check_impl(impl)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} do not match the hidden states {tuple(hidden.shape)} "
                         "(one target per row): pass labels of shape (batch, seq)")
    flat = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)  # (N, H); the head's device (device_map)
    targets = targets.reshape(-1).to(weight.device)  # (N,)
    device = flat.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else flat.dtype
    grad = torch.is_grad_enabled()
    needs = (grad and flat.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    use_liger = impl == "liger" or (impl == "auto" and any(needs) and _liger_ok(device, dtype))
    if use_liger and not _liger_ok(device, dtype):
        raise ValueError(f"loss_impl='liger' needs liger-kernel (pip install liger-kernel) and a CUDA device with "
                         f"fp32/bf16/fp16; got {device.type} / {dtype}. Use loss_impl='auto' or 'torch'")
    if use_liger and bias is not None and logit_scale != 1.0:
        if impl == "liger":
            raise ValueError("loss_impl='liger' cannot fold a logit scale into a head with a bias; use 'torch'")
        use_liger = False
    with torch.autocast(device.type, enabled=False):  # dtypes are explicit inside
        if use_liger:
            total = _liger_sum(flat, weight, bias, targets, logit_scale, softcap, dtype)
        else:
            total = _LinearCrossEntropy.apply(flat, weight, bias, targets, chunk_size, float(logit_scale), softcap,
                                              dtype, needs)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()  # the mean over valid targets, as reduction="mean"
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
