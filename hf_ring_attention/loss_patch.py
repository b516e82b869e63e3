"""Make a transformers ``*ForCausalLM`` compute its training loss without full logits.

``install_chunked_loss(model, chunk_size)`` puts a ``forward`` on the model instance. Called with
``labels``, it runs the model's own forward with ``labels=None`` while a pre-hook on the LM head
takes the head's input (the hidden states) and hands the head zero rows instead, then computes
``chunked_causal_lm_loss`` from those hidden states: ``outputs.loss`` is transformers' loss and
``outputs.logits`` is None. Everything happens inside the model's own forward call, so DDP,
FSDP2 (the head's weight is unsharded there) and accelerate's autocast wrapper see it as
usual. Without labels (generation, logits for metrics) the forward is the model's own.

What the family does to logits after the head is checked once per model: at the first call the
head gets two probe rows instead of zero, and the family's logits of them must equal one of
plain ``lm_head(h)``, a logit scale (Cohere ``logit_scale``, Granite ``1 / logits_scaling``,
Falcon-H1 ``lm_head_multiplier``, ``output_multiplier``) and/or a final softcap (Gemma 2/3).
Anything else is refused by name. Hidden-state scaling before the head (MiniCPM3) is in the
head's input, so it is covered. MoE load-balancing losses are added as the families do.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch
import torch.nn.functional as F

from .loss import IGNORE_INDEX, check_chunk_size, check_impl, chunked_causal_lm_loss

_STATE = "_hf_ring_loss"
_MARK = "_hf_ring_chunked_forward"
_PROBE = (16.0, 4096.0)  # diagonal logits of the probe rows: large enough that any real softcap bends them
_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier")  # logits * value
_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")  # cap * tanh(logits / cap)


@dataclasses.dataclass
class ChunkedLossState:
    """What the patched forward needs; lives on the model as ``_hf_ring_loss``."""

    chunk_size: int | None  # None: switched off (the forward passes every call through)
    impl: str
    previous: object  # the instance-level forward before ours (None: the class's)
    transform: tuple[float, float | None] | None = None  # (logit_scale, softcap), found at the first call


def _fix(model) -> str:
    return (f"{type(model).__name__}: pass loss_chunk_size=None to apply_ring_attention for transformers' own loss "
            "(with full logits)")


def _head(model) -> torch.nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise NotImplementedError(f"the chunked loss computes F.linear(hidden, lm_head.weight); this model's LM head "
                                  f"is {type(head).__name__} (quantized, adapted or missing). {_fix(model)}")
    return head


def check_model(model) -> None:
    """Raise NotImplementedError (naming the fix) for a head or loss the chunked loss cannot reproduce."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    _head(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "z_loss_coefficient", 0) or getattr(model, "z_loss_coefficient", 0):
        raise NotImplementedError(f"the model adds a z-loss computed from the full logits (z_loss_coefficient); "
                                  f"{_fix(model)}")
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        raise NotImplementedError(f"model.loss_function is {getattr(model.loss_function, '__name__', model.loss_function)}"
                                  f", not transformers' ForCausalLMLoss, which the chunked loss reproduces; "
                                  f"{_fix(model)}")


def install_chunked_loss(model: torch.nn.Module, chunk_size: int | None = 4096, *, impl: str = "auto"):
    """Make ``model(..., labels=...)`` compute transformers' loss in chunks, with ``logits=None``.

    Args:
        model: a transformers ``*ForCausalLM`` (its loss is ``ForCausalLMLoss``).
        chunk_size: rows of hidden states per LM-head + cross-entropy chunk; None removes the patch.
        impl: see ``chunked_causal_lm_loss`` ("auto", "torch", "liger").

    Returns:
        The same model (a second call only updates chunk_size and impl).

    Raises:
        ValueError: bad chunk_size or impl.
        NotImplementedError: a head or loss the chunked loss cannot reproduce (named, with the fix).
    """
    check_chunk_size(chunk_size)
    check_impl(impl)
    if chunk_size is None:
        return remove_chunked_loss(model)
    check_model(model)
    state = model.__dict__.get(_STATE)
    if state is not None:
        state.chunk_size, state.impl = chunk_size, impl
        return model

    def forward(self, *args, **kwargs):
        return _forward(self, *args, **kwargs)

    functools.update_wrapper(forward, type(model).forward)  # generate() reads forward's signature
    setattr(forward, _MARK, True)
    model.__dict__[_STATE] = ChunkedLossState(chunk_size, impl, model.__dict__.get("forward"))
    # A module-level function bound to the instance (no closure over the model): copy.deepcopy rebinds it.
    model.forward = types.MethodType(forward, model)
    return model


def remove_chunked_loss(model: torch.nn.Module):
    """Undo ``install_chunked_loss``. If another wrapper (e.g. accelerate's autocast) now wraps our
    forward, ours stays inside it as a pass-through."""
    state = model.__dict__.get(_STATE)
    if state is None:
        return model
    outer = model.__dict__.get("forward")
    if getattr(getattr(outer, "__func__", None), _MARK, False):
        if state.previous is None:
            del model.forward
        else:
            model.forward = state.previous
        del model.__dict__[_STATE]
    else:
        state.chunk_size = None
    return model


@functools.lru_cache(maxsize=None)
def _parameter_names(cls) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)[1:]  # without self


def _forward(self, *args, **kwargs):
    state: ChunkedLossState = self.__dict__[_STATE]
    inner = state.previous if state.previous is not None else functools.partial(type(self).forward, self)
    if args:  # positional arguments by name, so labels are found wherever they are
        names = _parameter_names(type(self))
        if len(args) > len(names) or any(n in kwargs for n in names[:len(args)]):
            return inner(*args, **kwargs)  # let the model raise its own TypeError
        kwargs.update(zip(names, args))
    keep = kwargs.get("logits_to_keep")
    if state.chunk_size is None or kwargs.get("labels") is None or not (keep is None or (isinstance(keep, int)
                                                                                          and keep == 0)):
        return inner(**kwargs)  # no loss asked for (as transformers: no labels, no loss), or a caller's own slice
    return _loss_forward(self, state, inner, kwargs)


def _probe_rows(weight: torch.Tensor) -> torch.Tensor:
    """(2, H) hidden rows whose logits against ``weight``'s largest row are exactly ``_PROBE``."""
    w = weight.detach().float()  # (V, H)
    norms = w.norm(dim=1)
    row = int(norms.argmax())
    unit = w[row] / norms[row] ** 2  # unit @ w[row] = 1
    return torch.stack([p * unit for p in _PROBE])


def _transform_candidates(model) -> list[tuple[float, float | None]]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    scales = [1.0]
    for owner in (model, getattr(model, "model", None), config):
        scales += [float(getattr(owner, n)) for n in _SCALES if number(getattr(owner, n, None))]
    scaling = getattr(config, "logits_scaling", None)
    if number(scaling) and scaling:
        scales += [1.0 / scaling, float(scaling)]  # Granite divides; some families multiply
    caps = [None] + [float(getattr(config, n)) for n in _CAPS if number(getattr(config, n, None))]
    return list(dict.fromkeys((s, c) for s in scales for c in caps))


def _match_transform(model, logits: torch.Tensor, probe: torch.Tensor, head: torch.nn.Module):
    """The (scale, softcap) that turns ``head(probe)`` into the family's ``logits``, or refuse."""
    with torch.no_grad():
        raw = F.linear(probe, head.weight, head.bias)  # the same op on the same rows as the family's head
        z = raw.float()
        got = None if logits is None else logits.detach().float()
        exact = raw.dtype == torch.float32 and logits is not None and logits.dtype == torch.float32
        tol = 1e-5 if exact else 2e-2  # 16-bit logits: the family's transform rounds in bf16/fp16
        candidates = _transform_candidates(model)
        for scale, cap in candidates:
            want = z * scale if cap is None else cap * torch.tanh(z * scale / cap)
            if got is not None and got.shape == want.shape and torch.allclose(
                    got, want, rtol=tol, atol=tol * float(want.abs().max())):
                return scale, cap
    raise NotImplementedError(f"{type(model).__name__} changes its logits after the LM head in a way the chunked "
                              f"loss does not reproduce (it matches none of (logit scale, softcap) = {candidates}); "
                              f"{_fix(model)}")


def _aux_coefficient(model) -> float:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for owner, name in ((model, "router_aux_loss_coef"), (model, "aux_loss_coef"), (config, "router_aux_loss_coef")):
        if getattr(owner, name, None) is not None:
            return getattr(owner, name)
    raise NotImplementedError(f"the model returns an aux_loss but no router_aux_loss_coef to add it with; "
                              f"{_fix(model)}")


def _loss_forward(self, state: ChunkedLossState, inner, kwargs: dict):
    """The model's forward with labels, its loss computed by ``chunked_causal_lm_loss``."""
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    check_model(self)  # PEFT, quantization or a new loss_function may have come after install
    head = _head(self)
    if type(head.weight).__name__ == "DTensor":
        raise NotImplementedError("the LM head's weight is a sharded DTensor when the loss runs (was the LM head "
                                  "given its own fully_shard?): shard it with the root module, or "
                                  f"{_fix(self)}")
    probe = _probe_rows(head.weight) if state.transform is None else None
    seen = []

    def take_input(module, args, kw):  # (B, S, H) -> the head gets (B, 0, H), or the probe rows once
        hidden = args[0] if args else kw["input"]
        rows = hidden[..., :0, :] if probe is None else \
            probe.to(hidden.device, hidden.dtype).expand(*hidden.shape[:-2], -1, -1)
        seen.append((hidden, rows))
        return (rows,), {}

    handle = head.register_forward_pre_hook(take_input, with_kwargs=True)
    try:
        out = inner(**kwargs, return_dict=True)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise NotImplementedError(f"the forward called its LM head {len(seen)} times (expected once); {_fix(self)}")
    hidden, rows = seen[0]
    if "loss" not in out.__dataclass_fields__ or "logits" not in out.__dataclass_fields__:
        raise NotImplementedError(f"the forward returns {type(out).__name__} without loss/logits; {_fix(self)}")
    if state.transform is None:
        state.transform = _match_transform(self, out.logits, rows, head)
    if shift_labels is None:  # as ForCausalLMLoss: shift on this (full) sequence
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    scale, cap = state.transform
    loss = chunked_causal_lm_loss(hidden, head.weight, shift_labels, bias=head.bias,
                                  num_items_in_batch=num_items_in_batch, chunk_size=state.chunk_size,
                                  logit_scale=scale, softcap=cap, impl=state.impl)
    if out.get("aux_loss") is not None:  # MoE: as the families add it when labels are given
        loss = loss + _aux_coefficient(self) * out["aux_loss"].to(loss.device)
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    out = type(out)(**{**fields, "loss": loss, "logits": None})
    return out if return_dict else out.to_tuple()
