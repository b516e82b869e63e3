"""Transformers glue: a ring attention function and a mask function, registered through
transformers' public ``AttentionInterface`` / ``AttentionMaskInterface`` under our own key.

``apply_ring_attention(model, group)`` switches one model to that key; nothing private of
transformers is patched. The attention function is the transformers contract
``(module, query, key, value, attention_mask, *, scaling, dropout, sliding_window, **kwargs)
-> (out (B, S, H, D), None)`` with query (B, Hq, S_local, D) and key/value (B, Hkv, S_local, D)
of this rank's zigzag shard (https://huggingface.co/docs/transformers/en/attention_interface).

Validation happens once per forward, where the call enters: a forward pre-hook on the model
(and on its decoder, for callers that run the decoder alone) checks the call locally, runs ONE
agreement over the ring (``agreement.agree``: shapes, dtype, layout, document bounds, config,
and every rank's local verdict) and passes a ``ring_context`` keyword down; transformers hands
the model's keyword arguments on to every attention call, so the attention function runs the
ring with no collective of its own (and the same context is there when checkpointing recomputes
a layer in backward).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .agreement import agree, dtype_code
from .compat import check_model, match_head_dims
from .loss import check_chunk_size, check_impl
from .loss_patch import check_model as check_loss_model, install_chunked_loss, remove_chunked_loss
from .mixers import install_mixers, remove_mixers
from .ring import LAYOUTS, RingOptions, make_config, run_ring
from .sharding import gather_shards, zigzag_unshard
from .ulysses import UlyssesConfig, head_split, run_hybrid

# Our own key: names containing "flash", "sdpa" or "flex_attention" trigger transformers'
# built-in checks for those kernels.
ATTN_KEY = "hf_ring"
_STATE_ATTR = "_hf_ring_state"
_DYNAMIC_ROPE = ("dynamic", "longrope")
_UNSUPPORTED = {  # kwarg a model passes -> what it means
    "softcap": "attention logit softcapping (e.g. Gemma 2)",
    "s_aux": "attention sinks (e.g. gpt-oss)",
    "sinks": "attention sinks",
    "position_bias": "additive position biases (ALiBi / T5-style)",
}
# Config attributes whose values every rank must share (they shape attention and positions).
_CONFIG_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "num_hidden_layers",
                  "sliding_window", "layer_types", "rope_parameters", "rope_scaling", "max_position_embeddings")


@dataclass(frozen=True)
class RingForward:
    """What one agreed forward pass tells every attention call (the ``ring_context`` keyword).

    Attributes:
        layout: "zigzag" or "zigzag_docs".
        documents: per batch row, the global document boundaries (0, ..., N), or None for one document.
        length: the global (padded) sequence length N.
        max_position: the largest position id over the ring (what an unsharded dynamic RoPE sees).
        ulysses_size: U; this rank's tokens are ``sharding.sp_shard_index(layout, sp_rank, U * C, S_local,
            documents[b] (zigzag_docs only), ulysses_size=U)``.
        padding_between_documents: ``shard_batch`` padded a document that another follows (token
            mixers outside attention would carry the padding into the next document: they refuse).
    """

    layout: str
    documents: tuple[tuple[int, ...] | None, ...]
    length: int
    max_position: int
    ulysses_size: int = 1
    padding_between_documents: bool = False


@dataclass
class RingState:
    """What the attention function needs, attached to each module of the patched model.

    ``group`` / ``sp_size``: the sequence-parallel group (U * C ranks: the per-forward agreement,
    position gathers); ``ring_*``: the ring (C ranks); ``ulysses_*``: the all-to-all group (U ranks).
    """

    group: dist.ProcessGroup | None
    sp_size: int
    ring_group: dist.ProcessGroup | None = None
    ring_rank: int = 0
    ring_size: int = 1
    ulysses_group: dist.ProcessGroup | None = None
    ulysses_size: int = 1
    kernel: object = None  # a kernel name or a kernels.Kernel (None: auto)
    detect_documents: bool = True
    options: RingOptions | None = None
    forward: RingForward | None = None  # the current forward's context (read by the RoPE hooks)


def ring_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                           scaling: float | None = None, dropout: float = 0.0,
                           sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers attention function running exact ring attention over the ring group.

    Returns:
        (attn_output (B, S_local, Hq, D), None); attention weights are never materialised.

    Raises:
        ValueError / NotImplementedError: dropout, masks, KV caches or features the ring
            does not implement, each naming the fix.
    """
    state: RingState | None = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"attn_implementation={ATTN_KEY!r} needs hf_ring_attention.apply_ring_attention(model) "
                         "(it attaches the process group); set the implementation through that call")
    for name, what in _UNSUPPORTED.items():
        value_ = kwargs.get(name)
        if value_ is not None:
            shown = f"a tensor of shape {tuple(value_.shape)}" if torch.is_tensor(value_) else repr(value_)
            raise NotImplementedError(f"ring attention does not implement {what} (the model passes {name}= "
                                      f"{shown}); use the model's own attention implementation")
    if dropout:
        raise ValueError(f"attention dropout={dropout} is not supported by ring attention; set "
                         "model.config.attention_dropout = 0.0")
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise NotImplementedError("ring attention supports causal decoder self-attention only; this module is "
                                  "bidirectional (an encoder or cross-attention)")
    decode = kwargs.get("ring_decode")  # new tokens against a sharded KV cache (hf_ring_attention.generation)
    if decode is not None:
        return decode.attention(query, key, value, scaling=scaling, sliding_window=sliding_window), None
    if attention_mask is not None:
        raise ValueError("ring attention takes no attention_mask tensor (got one of shape "
                         f"{tuple(attention_mask.shape)}); pass attention_mask=None, and packed documents "
                         "as restarting position_ids")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"query length {query.shape[2]} != key length {key.shape[2]}: a KV cache is in use. "
                         "Ring attention runs without a cache: call the model with use_cache=False, or "
                         "remove_ring_attention(model) before generate()")
    ctx: RingForward | None = kwargs.get("ring_context")
    if ctx is None:  # decoder layers that drop **kwargs (StableLM, Nemotron): this forward's pre-hook stored it
        ctx = state.forward
        if ctx is not None and (ctx.length != query.shape[2] * state.ring_size or len(ctx.documents) != query.shape[0]):
            raise ValueError(f"{type(module).__name__} got no ring_context (its decoder layer drops keyword "
                             f"arguments) and the last forward's context is for {len(ctx.documents)} rows of "
                             f"{ctx.length} tokens, not {query.shape[0]} of {query.shape[2] * state.ring_size}: run "
                             "each forward's backward before the next forward")
    if ctx is None:
        raise ValueError("ring attention was called outside a forward of the patched model (no ring_context): "
                         "call the model or its decoder (their forward agrees on the shards first), or call "
                         "hf_ring_attention.ring_attention directly")
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast RoPE returns fp32 q/k while v is in the autocast dtype; SDPA casts all
        # three itself. Do the same, then run the ring outside autocast (fp32 accumulators stay fp32).
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling  # of the q/k head dim, before padding
    query, key, value, head_dim_v = match_head_dims(query, key, value)  # MLA: value head dim != q/k head dim
    tag = int(getattr(module, "layer_idx", 0) or 0)

    def ring_config(q, k, v, docs):
        return make_config(q, k, v, group=state.ring_group, rank=state.ring_rank, ring_size=state.ring_size,
                           causal=True, scale=scaling, layout=ctx.layout, sliding_window=sliding_window,
                           cu_seqlens=docs, kernel=state.kernel, options=state.options, tag=tag)

    def one(q, k, v, docs):
        if state.ulysses_size == 1:
            return run_ring(q, k, v, ring_config(q, k, v, docs)).transpose(1, 2)
        # The head split follows from the agreed config (the forward hook checked it): every rank
        # gets the same answer, so no collective is needed here.
        opts = state.options or RingOptions()
        ucfg = UlyssesConfig(state.ulysses_group, state.ulysses_size,
                             head_split(q.shape[1], k.shape[1], state.ulysses_size),
                             timeout=opts.timeout, all_to_all=opts.all_to_all)
        return run_hybrid(q, k, v, ucfg, lambda qh, kh, vh: ring_config(qh, kh, vh, docs))  # (B, S, Hq, D)

    docs = ctx.documents
    with torch.autocast(device_type, enabled=False):
        if all(d == docs[0] for d in docs):
            out = one(query, key, value, docs[0])
        else:  # rows packed differently: one ring pass per row
            out = torch.cat([one(query[i:i + 1], key[i:i + 1], value[i:i + 1], d) for i, d in enumerate(docs)])
    return out[..., :head_dim_v].contiguous(), None


def ring_mask(*, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """Transformers mask function: validates, and builds no (S_local x S_local) mask.

    The ring builds the masks it needs from global positions block by block.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("ring attention does not support padding in attention_mask; pack sequences instead "
                         "(shard_batch pads with ignored labels, which needs no attention mask)")
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_KEY, ring_attention_forward)
    AttentionMaskInterface.register(ATTN_KEY, ring_mask)


def _make_state(group, **kwargs) -> RingState:
    """The state of a patch over ``group``: a ``RingGroups`` (any Ulysses x ring), or a ring's ProcessGroup."""
    if hasattr(group, "sp_group"):  # a RingGroups
        return RingState(group.sp_group, group.sp_size, group.ring_group, group.ring_rank, group.ring_size,
                         getattr(group, "ulysses_group", None), getattr(group, "ulysses_size", 1), **kwargs)
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if size > 1 else 0
    return RingState(group, size, group, rank, size, **kwargs)


# ------------------------------------------------------------------------------ the forward hook
def _local_verdict(model, kwargs: dict, ids_shape, state: RingState) -> str | None:
    """This rank's own checks of a forward call (no communication): an error message or None."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if getattr(cache, "ring_sharded", False):
        pass  # hf_ring_attention.ring_generate's prefill: a cache sharded like the ring (generation.RingCache)
    elif kwargs.get("use_cache") or cache is not None:
        return ("ring attention runs without a KV cache: pass use_cache=False; generate with "
                "hf_ring_attention.ring_generate (sharded cache), or remove_ring_attention(model) first")
    if ids_shape is None or len(ids_shape) < 2:
        return "the forward needs input_ids (B, S_local) or inputs_embeds (B, S_local, H)"
    pos = kwargs.get("position_ids")
    if state.sp_size > 1 and pos is None:
        return ("a ring-sharded forward needs the global position_ids of this rank's tokens (otherwise RoPE sees "
                "local positions); use hf_ring_attention.shard_batch(batch, groups)")
    if pos is not None and (pos.dim() != 2 or pos.shape[-1] != ids_shape[1]):
        return f"position_ids of shape {tuple(pos.shape)} do not match the tokens (B, S_local) = {tuple(ids_shape[:2])}"
    if state.sp_size > 1 and ids_shape[1] * state.ulysses_size % 2:
        return (f"the ring shard length {ids_shape[1]} x {state.ulysses_size} is odd: a zigzag shard holds two "
                "equal chunks; pad the full sequence to a multiple of 2 * ring_size * ulysses_size (shard_batch "
                "does this)")
    if state.ulysses_size > 1:
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(text, "num_attention_heads", None)
        if heads is not None:
            head_split(heads, getattr(text, "num_key_value_heads", None) or heads, state.ulysses_size)  # raises
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return ("ring attention does not support padding in attention_mask; drop the mask and pad with ignored "
                "labels (shard_batch does this)")
    layout, docs = kwargs.get("ring_layout"), kwargs.get("ring_documents")
    if layout is not None and layout not in LAYOUTS:
        return f"ring_layout={layout!r} is not known; choose one of {LAYOUTS}"
    if docs is not None:
        total = ids_shape[1] * state.sp_size
        if len(docs) != ids_shape[0] or any(len(d) < 2 or d[0] != 0 or d[-1] != total for d in docs):
            return (f"ring_documents must give, for each of the {ids_shape[0]} rows, boundaries from 0 to the global "
                    f"length {total}; got {docs!r}. Pass the dict shard_batch returns as it is")
    return None


def _forward_signature(model, kwargs: dict, ids_shape, state: RingState) -> dict:
    device_type = model.device.type if hasattr(model, "device") else "cpu"
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else model.dtype
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"batch and local length (B, S_local)": tuple(ids_shape[:2]) if ids_shape else (),
            "dtype": dtype_code(dtype), "ulysses x ring size": (state.ulysses_size, state.ring_size),
            "ring_layout": kwargs.get("ring_layout"), "ring_documents": kwargs.get("ring_documents"),
            "ring_padding_between_documents": kwargs.get("ring_padding_between_documents"),
            "model config": tuple(_stable_repr(getattr(text, f, None)) for f in _CONFIG_FIELDS),
            "training mode": int(model.training), "gradients enabled": int(torch.is_grad_enabled())}


def _stable_repr(value) -> str:
    """repr with dict keys sorted: a dict built from a set (e.g. Dory's per-layer-type rope_parameters)
    has a key order that depends on each process's string hash seed."""
    try:
        return json.dumps(value, sort_keys=True, default=repr)
    except TypeError:  # keys of mixed types
        return repr(value)


def _documents_from_positions(pos: torch.Tensor, state: RingState, batch: int) -> tuple:
    """Per-row global document bounds from restarting position ids (an all-gather over the sp group)."""
    if state.ulysses_size > 1:
        pos = gather_shards(pos, dim=-1, group=state.group, sp_size=state.sp_size, ulysses_size=state.ulysses_size,
                            layout="zigzag")
    elif state.ring_size > 1:
        pos = zigzag_unshard(pos.contiguous(), dim=-1, group=state.group)
    pos = pos.expand(batch, -1)
    starts = torch.diff(pos, dim=-1) != 1  # (B, N - 1): True where a new document begins
    out = []
    for row in starts.cpu():
        cut = (torch.nonzero(row).flatten() + 1).tolist()
        out.append((0, *cut, pos.shape[-1]) if cut else None)
    return tuple(out)


def _before_forward(model, args, kwargs):
    """Forward pre-hook: local checks, one agreement over the ring, then the ``ring_context`` keyword."""
    if kwargs.get("ring_context") is not None:
        return None  # the outer model's hook already agreed (the decoder called from the causal-LM forward)
    state: RingState = getattr(model, _STATE_ATTR)
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    ids_shape = tuple(ids.shape) if ids is not None else (tuple(embeds.shape) if embeds is not None else None)
    try:
        error = _local_verdict(model, kwargs, ids_shape, state)
    except Exception as e:  # noqa: BLE001 - becomes this rank's verdict: every rank raises it together
        error = f"{type(e).__name__}: {e}"
    pos = kwargs.get("position_ids")
    local_max = int(pos.max()) if error is None and pos is not None and pos.numel() else 0
    if state.sp_size > 1:
        device = pos.device if pos is not None else (ids if ids is not None else embeds).device
        extras = agree(_forward_signature(model, kwargs, ids_shape, state), error, group=state.group, device=device,
                       what=f"the ring forward of {type(model).__name__}", extra=(local_max,))
        max_position = max(e[0] for e in extras)
    elif error is not None:
        raise ValueError(error)
    else:
        max_position = local_max
    b, s_local = ids_shape[0], ids_shape[1]
    docs = kwargs.pop("ring_documents", None)
    layout = kwargs.pop("ring_layout", None) or ("zigzag_docs" if docs is not None and state.ring_size > 1
                                                 and any(len(d) > 2 for d in docs) else "zigzag")
    total = s_local * state.sp_size
    if docs is not None:
        docs = tuple(tuple(int(x) for x in d) if len(d) > 2 else None for d in docs)
    elif state.detect_documents and pos is not None:
        docs = _documents_from_positions(pos, state, b)  # agreed above: every rank gathers
    else:
        docs = (None,) * b
    if layout == "zigzag_docs":  # one document per row is the plain zigzag: the planner wants it as bounds
        docs = tuple(d if d is not None else (0, total) for d in docs)
    between = any(kwargs.pop("ring_padding_between_documents", None) or ())
    ctx = RingForward(layout, docs, total, max_position, state.ulysses_size, between)
    state.forward = ctx
    kwargs["ring_context"] = ctx
    return args, kwargs


def _dynamic_rope_hooks(model, state: RingState) -> list:
    """Make dynamic / longrope RoPE pick its frequencies from the ring's largest position.

    Transformers' ``dynamic_rope_update`` uses max(position_ids) + 1 of the tensor it gets; a zigzag
    shard holds different positions on each rank. The hooks append the ring's largest position
    (agreed in the forward hook) as an extra column and drop it from the (cos, sin) output.
    """
    modules = []
    for m in model.modules():
        kind = getattr(m, "rope_type", None)
        kinds = kind.values() if isinstance(kind, dict) else [kind]
        if hasattr(m, "inv_freq") and any(isinstance(k, str) and any(d in k for d in _DYNAMIC_ROPE) for k in kinds):
            modules.append(m)
    if not modules or state.sp_size == 1:
        return []

    def pre(module, args, kwargs):
        ctx = state.forward
        if ctx is None:
            return None
        pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]  # (B, S_local)
        pos = torch.cat([pos, pos.new_full((pos.shape[0], 1), ctx.max_position)], dim=1)
        if "position_ids" in kwargs:
            return args, {**kwargs, "position_ids": pos}
        return (args[0], pos, *args[2:]), kwargs

    def post(module, args, kwargs, output):
        if state.forward is None:
            return None
        return tuple(o[:, :-1] for o in output)  # (cos, sin): (B, S_local, D)

    return [h for m in modules for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                         m.register_forward_hook(post, with_kwargs=True))]


def apply_ring_attention(model: torch.nn.Module, group=None, *, kernel=None, detect_documents: bool = True,
                         options: RingOptions | None = None, loss_chunk_size: int | None = 4096,
                         loss_impl: str = "auto") -> torch.nn.Module:
    """Switch a transformers model to exact ring attention over ``group``.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through ``AttentionInterface``
            (Llama, Mistral, Qwen2/3, ...).
        group: the ring's ProcessGroup, or a ``RingGroups`` (default: the world group).
        kernel: block kernel name, or a ``kernels.Kernel`` (default: chosen per device and dtype).
        detect_documents: for calls without ``ring_documents`` (not from ``shard_batch``), treat
            restarting position_ids as packed documents (as transformers does).
        options: the ring's communication and tiling (``RingOptions``; default: ``RingComm`` with the
            group's timeout).
        loss_chunk_size: with labels, compute transformers' loss from the LM head's input
            ``loss_chunk_size`` rows at a time (``hf_ring_attention.loss``): no (S_local x vocab)
            logits, ``outputs.logits`` is None. None: transformers' own loss and logits.
        loss_impl: "auto" (liger-kernel's fused kernel on CUDA when installed, else torch),
            "torch" or "liger".

    Returns:
        The same model (idempotent: a second call only updates the group, options and loss settings).

    Raises:
        ValueError: a bad loss_chunk_size or loss_impl.
        NotImplementedError: models the ring would compute wrongly (see ``compat.check_model``: token
            mixers outside attention other than those ``mixers.install_mixers`` makes exact (it is
            called here), local positions, sinks, chunked or bidirectional attention, ...)
            or that cannot switch attention; an LM head or loss the chunked loss cannot reproduce
            (pass loss_chunk_size=None); the model is left unpatched.
    """
    from transformers import PreTrainedModel

    check_chunk_size(loss_chunk_size)
    check_impl(loss_impl)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise NotImplementedError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    check_model(model)  # families the ring would compute silently wrong (hf_ring_attention.compat)
    if loss_chunk_size is not None:
        check_loss_model(model)  # before anything changes
    _register()
    state = _make_state(group, kernel=kernel, detect_documents=detect_documents, options=options)
    if hasattr(model, "_hf_ring_saved"):
        remove_ring_attention(model)
    previous = config._attn_implementation
    model.set_attn_implementation(ATTN_KEY)
    if config._attn_implementation != ATTN_KEY:
        raise NotImplementedError(f"{type(model).__name__} cannot switch its attention implementation "
                                  "(it does not use transformers' AttentionInterface)")
    entries = [model]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    # A PreTrainedModel only: ModernBertDecoderForCausalLM.get_decoder() returns its LM head (a Linear).
    if isinstance(decoder, PreTrainedModel) and decoder is not model:
        entries.append(decoder)  # e.g. evaluate_perplexity runs the decoder alone
    hooks = [m.register_forward_pre_hook(_before_forward, with_kwargs=True) for m in entries]
    hooks += _dynamic_rope_hooks(model, state)
    model._hf_ring_saved = (previous, getattr(config, "use_cache", None), hooks)  # some configs lack it
    config.use_cache = False
    for m in model.modules():
        setattr(m, _STATE_ATTR, state)
    install_chunked_loss(model, loss_chunk_size, impl=loss_impl)  # None removes it
    # Recurrences / convolutions outside attention (hf_ring_attention.mixers), over the sp group.
    install_mixers(model, state.group, ulysses_size=state.ulysses_size)
    return model


def patched_ring_size(model: torch.nn.Module) -> int | None:
    """The sequence-parallel size (U x C; the ring size when U = 1) ``model`` is patched for by
    ``apply_ring_attention``, or None when it is not patched."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None or model.config._attn_implementation != ATTN_KEY else state.sp_size


def remove_ring_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation (and ``use_cache``) and the loss the model had before."""
    remove_chunked_loss(model)
    saved = getattr(model, "_hf_ring_saved", None)
    if saved is None:
        return model
    previous, use_cache, hooks = saved
    for h in hooks:
        h.remove()
    remove_mixers(model)
    model.set_attn_implementation(previous)
    model.config.use_cache = use_cache
    for m in model.modules():
        if hasattr(m, _STATE_ATTR):
            delattr(m, _STATE_ATTR)
    del model._hf_ring_saved
    return model
