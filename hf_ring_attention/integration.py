"""Transformers glue: a ring attention function and a mask function, registered through
transformers' public ``AttentionInterface`` / ``AttentionMaskInterface`` under our own key.

``apply_ring_attention(model, group)`` switches one model to that key; nothing private of
transformers is patched. The attention function is the transformers contract
``(module, query, key, value, attention_mask, *, scaling, dropout, sliding_window, **kwargs)
-> (out (B, S, H, D), None)`` with query (B, Hq, S_local, D) and key/value (B, Hkv, S_local, D)
of this rank's zigzag shard (https://huggingface.co/docs/transformers/en/attention_interface).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .ring import ring_attention
from .sharding import zigzag_unshard

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


@dataclass
class RingState:
    """What the attention function needs, attached to each module of the patched model."""

    group: dist.ProcessGroup | None
    world_size: int
    layout: str = "zigzag"
    kernel: str | None = None
    detect_documents: bool = True
    _docs_cache: tuple = field(default=(None, None), repr=False)

    def document_bounds(self, position_ids: torch.Tensor | None, batch: int) -> list[list[int] | None]:
        """Global document boundaries per batch row, from the (sharded) position ids.

        A document starts where the position does not follow the previous one by 1, as in
        transformers' ``find_packed_sequence_indices``. All layers of one forward pass share
        the same position_ids tensor, so the one small all-gather runs once per forward.
        """
        if position_ids is None or not self.detect_documents:
            return [None] * batch
        # Keyed on the tensor object itself (and its version): an address could be reused by a
        # new tensor on one rank only, which would skip an all-gather its peers make.
        cached, bounds = self._docs_cache
        if cached is not None and cached[0] is position_ids and cached[1] == position_ids._version:
            return bounds
        key = (position_ids, position_ids._version)
        pos = zigzag_unshard(position_ids.contiguous(), dim=-1, group=self.group) if self.world_size > 1 \
            else position_ids
        pos = pos.expand(batch, -1)
        starts = torch.diff(pos, dim=-1) != 1  # (B, N - 1): True where a new document begins
        bounds = []
        for row in starts.cpu():
            cut = (torch.nonzero(row).flatten() + 1).tolist()
            bounds.append([0, *cut, pos.shape[-1]] if cut else None)
        self._docs_cache = (key, bounds)
        return bounds


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
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"ring attention does not implement {what} ({name}={kwargs[name]!r}); "
                                      "use the model's own attention implementation")
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
    layout = state.layout
    docs = kwargs.get("ring_documents")  # from shard_batch: per-row boundaries, per-document zigzag
    if docs is not None:
        layout = "zigzag_docs"
        docs = [list(d) for d in docs]
    else:
        docs = state.document_bounds(kwargs.get("position_ids"), query.shape[0])
    common = dict(group=state.group, causal=True, scale=scaling, layout=layout,
                  sliding_window=sliding_window, kernel=state.kernel)
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast RoPE returns fp32 q/k while v is in the autocast dtype; SDPA casts all
        # three itself. Do the same, then run the ring outside autocast (fp32 accumulators stay fp32).
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if all(d == docs[0] for d in docs):
            out = ring_attention(query, key, value, cu_seqlens=docs[0], **common)
        else:  # rows packed differently: one ring pass per row
            out = torch.cat([ring_attention(query[i:i + 1], key[i:i + 1], value[i:i + 1], cu_seqlens=d,
                                            **common) for i, d in enumerate(docs)], dim=0)
    return out.transpose(1, 2).contiguous(), None


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


def _resolve_group(group) -> dist.ProcessGroup | None:
    return getattr(group, "ring_group", group)  # a RingGroups or a ProcessGroup


def _check_call(model, args, kwargs, state: RingState) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if getattr(cache, "ring_sharded", False):
        pass  # hf_ring_attention.ring_generate: a cache sharded like the ring (generation.RingCache)
    elif kwargs.get("use_cache") or cache is not None:
        raise ValueError("ring attention runs without a KV cache: pass use_cache=False; generate with "
                         "hf_ring_attention.ring_generate (sharded cache), or remove_ring_attention(model) first")
    if state.world_size > 1 and kwargs.get("position_ids") is None:
        raise ValueError("a ring-sharded forward needs the global position_ids of this rank's tokens "
                         "(otherwise RoPE sees local positions); use hf_ring_attention.shard_batch(batch, groups)")
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    if state.world_size > 1 and torch.is_grad_enabled() and rope.get("rope_type", rope.get("type")) in _DYNAMIC_ROPE:
        raise NotImplementedError(f"rope_type={rope.get('rope_type')!r} picks its frequencies from the largest "
                                  "position each rank sees, which differs across ring ranks; train with a static "
                                  "RoPE type (default, linear, yarn, llama3). hf_ring_attention.evaluate_perplexity "
                                  "evaluates dynamic RoPE exactly (under torch.no_grad)")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("ring attention does not support padding in attention_mask; drop the mask and pad "
                         "with ignored labels (shard_batch does this)")


def apply_ring_attention(model: torch.nn.Module, group=None, *, kernel: str | None = None,
                         detect_documents: bool = True) -> torch.nn.Module:
    """Switch a transformers model to exact ring attention over ``group``.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through ``AttentionInterface``
            (Llama, Mistral, Qwen2/3, ...).
        group: the ring's ProcessGroup, or a ``RingGroups`` (default: the world group).
        kernel: block kernel name (default: chosen per device and dtype).
        detect_documents: treat restarting position_ids as packed documents (as transformers does).

    Returns:
        The same model (idempotent: a second call only updates the group).

    Raises:
        NotImplementedError: encoder-decoder models or models that cannot switch attention.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise NotImplementedError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError("encoder-decoder models are not supported by ring attention")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("attention logit softcapping is not supported by ring attention")
    _register()
    ring = _resolve_group(group)
    world = dist.get_world_size(ring) if dist.is_initialized() else 1
    state = RingState(ring, world, kernel=kernel, detect_documents=detect_documents)
    if not hasattr(model, "_hf_ring_saved"):
        previous = config._attn_implementation
        model.set_attn_implementation(ATTN_KEY)
        if config._attn_implementation != ATTN_KEY:
            raise NotImplementedError(f"{type(model).__name__} cannot switch its attention implementation "
                                      "(it does not use transformers' AttentionInterface)")
        hook = model.register_forward_pre_hook(
            lambda m, a, k: _check_call(m, a, k, getattr(m, _STATE_ATTR)), with_kwargs=True)
        model._hf_ring_saved = (previous, config.use_cache, hook)
        config.use_cache = False
    for m in model.modules():
        setattr(m, _STATE_ATTR, state)
    return model


def remove_ring_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation (and ``use_cache``) the model had before."""
    saved = getattr(model, "_hf_ring_saved", None)
    if saved is None:
        return model
    previous, use_cache, hook = saved
    hook.remove()
    model.set_attn_implementation(previous)
    model.config.use_cache = use_cache
    for m in model.modules():
        if hasattr(m, _STATE_ATTR):
            delattr(m, _STATE_ATTR)
    del model._hf_ring_saved
    return model
