"""Token mixers outside attention (recurrences, convolutions), made exact on a sharded sequence.

Under the ring each rank holds a shard of the sequence (zigzag: chunks r and 2C-1-r), so a
recurrence or convolution run on the shard would see the wrong tokens. ``install_mixers`` (called
by ``apply_ring_attention``) replaces the forward of every known mixer module of the model with
one that computes, for this rank's tokens, exactly what the unpatched mixer computes on the whole
sequence; ``remove_mixers`` restores the original forwards.

Strategies (``install_mixers(strategy=...)``):
- "heads": head/channel-parallel, see ``mixer_forwards`` (gated delta-net, Mamba2) or halo
  exchange (short convolutions). O(N / C) work and memory per rank. The default where it applies.
- "gather": generic and exact for any mixer: all-gather the mixer's input over the sp group in
  sequence order, run the unpatched mixer on the whole sequence on every rank, keep this rank's
  tokens (backward: the gathered input's gradient is summed back onto each token's owner).
  O(N) work and memory per rank and mixer layer. Used when a model has fewer heads than ranks.

Packed documents: the mixers of these families (torch paths) do NOT reset their state where
``position_ids`` restart, so the unpatched model mixes across documents of a packed row; so does
the patched one (it equals the unpatched model on the same row). Kernel-only document resets
(``seq_idx`` / ``cu_seq_lens_*`` passed by a collator) are refused.

``exact_mixers(model)`` / ``exact_layer_types(model)`` tell ``compat`` which mixers (and config layer
types) are handled, so it refuses only the rest.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .mixer_forwards import gated_delta_net_forward, mamba2_forward, short_conv_forward
from .seqcomm import SeqLayout, gather_sequence, local_tokens, seq_layout

STRATEGIES = ("auto", "heads", "gather")
_SAVED = "_hf_ring_mixers"
# Keyword arguments that would reset state per document inside a kernel: positions of the local
# shard, which the whole-sequence mixer cannot use.
_DOC_KWARGS = ("seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")


@dataclass(frozen=True)
class MixerKind:
    """A known mixer class: what it is, and its exact sharded forward (None: gather only)."""

    feature: str
    forward: Callable | None
    units: Callable[[torch.nn.Module], int]  # how many heads / groups the head split divides


def _gdn_units(m) -> int:
    return m.num_k_heads


def _mamba2_units(m) -> int:
    return m.num_heads


def _no_units(m) -> int:
    return 1 << 30  # a halo exchange works at any size


_GDN = MixerKind("gated delta-net (linear attention) layers", gated_delta_net_forward, _gdn_units)
_MAMBA2 = MixerKind("Mamba2 (state-space) layers", mamba2_forward, _mamba2_units)
_SHORT_CONV = MixerKind("short-convolution layers", short_conv_forward, _no_units)

# Class name -> kind. Each is checked against the unpatched model in tests/test_mixers.py; the
# Moe/Granite/Lfm3 variants are the same code as their base class (transformers' modular copies).
MIXERS: dict[str, MixerKind] = {
    "Qwen3NextGatedDeltaNet": _GDN,
    "Qwen3_5GatedDeltaNet": _GDN,
    "Qwen3_5MoeGatedDeltaNet": _GDN,
    "BambaMixer": _MAMBA2,
    "GraniteMoeHybridMambaLayer": _MAMBA2,
    "Lfm2ShortConv": _SHORT_CONV,
    "Lfm2MoeShortConv": _SHORT_CONV,
    "Lfm3ShortConv": _SHORT_CONV,  # LFM2's code (checked at ring 2 by tests/test_families.py)
}


def exact_mixers(model: torch.nn.Module) -> dict[str, str]:
    """Module name -> feature, for every token mixer of ``model`` that ``install_mixers`` makes exact."""
    return {name: MIXERS[type(m).__name__].feature for name, m in model.named_modules()
            if type(m).__name__ in MIXERS}


def exact_layer_types(model: torch.nn.Module) -> set[str]:
    """Config layer types (``layer_types`` / ``layers_block_type``) whose every layer holds a handled mixer.

    A decoder layer counts as handled when one of its sub-modules is in ``MIXERS``; a type with a
    layer holding none (or a model whose decoder layers cannot be found) is not returned.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_list = None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for owner in (decoder, getattr(model, "model", None), model):
        if isinstance(getattr(owner, "layers", None), torch.nn.ModuleList):
            layer_list = owner.layers
            break
    if text is None or layer_list is None:
        return set()
    handled: dict[str, bool] = {}
    for attr in ("layers_block_type", "layer_types"):  # both, when a config has both (vocabularies differ)
        try:
            names = getattr(text, attr, None) or ()  # a property on some configs (Bamba)
        except Exception:  # noqa: BLE001 - some configs raise on access of per-layer attributes
            names = ()
        if not isinstance(names, (list, tuple)):
            continue
        for kind, layer in zip(names, layer_list):
            mine = any(type(m).__name__ in MIXERS for m in layer.modules())
            handled[kind] = handled.get(kind, True) and mine
    return {kind for kind, ok in handled.items() if ok}


def install_mixers(model: torch.nn.Module, group=None, *, strategy: str = "auto",
                   ulysses_size: int | None = None) -> dict[str, str]:
    """Make every known token mixer of ``model`` exact on the sequence-parallel group (idempotent).

    Args:
        model: the model (``apply_ring_attention`` calls this).
        group: the sp ProcessGroup (U * C ranks), or a ``RingGroups``; None: the default group.
        strategy: "auto" ("heads" where the mixer has at least as many heads as ranks, else
            "gather"), "heads" or "gather" (see the module docstring).
        ulysses_size: U, the Ulysses pieces of each ring shard (``sharding.sp_shard_index``); None:
            the ``RingGroups``' own, or 1 for a plain group.

    Returns:
        Module name -> the strategy installed.

    Raises:
        ValueError: an unknown strategy, "heads" for a mixer with fewer heads than ranks, or a
            ``ulysses_size`` that does not divide the group's size.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not known; choose one of {STRATEGIES}")
    if ulysses_size is None:
        ulysses_size = getattr(group, "ulysses_size", 1)
    group = getattr(group, "sp_group", group)
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    if ulysses_size < 1 or size % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} does not divide the sp group's {size} ranks; pass the "
                         "RingGroups from setup_groups (or its ulysses_size)")
    remove_mixers(model)
    saved, chosen = [], {}
    for name, module in model.named_modules():
        kind = MIXERS.get(type(module).__name__)
        if kind is None:
            continue
        units = kind.units(module)
        how = strategy if strategy != "auto" else ("heads" if units >= size else "gather")
        if how == "heads" and units < size:
            raise ValueError(f"{name} ({type(module).__name__}) has {units} heads to split over {size} ranks; use "
                             "strategy='gather' (or 'auto') for fewer heads than ranks")
        saved.append((module, module.__dict__.get("forward")))
        module.forward = types.MethodType(_sharded_forward(module.forward, kind, how, group, ulysses_size), module)
        chosen[name] = how
    model.__dict__[_SAVED] = saved  # not an nn.Module attribute: no state_dict / module-tree entry
    return chosen


def remove_mixers(model: torch.nn.Module) -> None:
    """Restore the forwards ``install_mixers`` replaced."""
    for module, previous in model.__dict__.pop(_SAVED, ()):
        del module.forward
        if previous is not None:
            module.forward = previous


def _sharded_forward(original: Callable, kind: MixerKind, how: str, group, ulysses_size: int) -> Callable:
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):  # the mixers' signature
        ctx = kwargs.pop("ring_context", None)
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if size == 1:
            return original(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        name = type(self).__name__
        if ctx is None:
            raise ValueError(f"{name} was called outside a forward of the patched model (no ring_context): call "
                             "the model or its decoder, whose forward agrees on the shards first")
        for old in ("cache_params", "past_key_values"):  # deprecated names of the cache
            cache = cache if kwargs.get(old) is None else kwargs.pop(old)
        if cache is not None:
            raise ValueError(f"{name} on a sharded sequence runs without a cache: call the model with "
                             "use_cache=False, or remove_ring_attention(model) before generate()")
        if attention_mask is not None:
            raise ValueError(f"{name} on a sharded sequence takes no attention_mask (padding); pad with ignored "
                             "labels at the end instead (shard_batch does this)")
        docs = [k for k in _DOC_KWARGS if kwargs.get(k) is not None]
        if docs:
            raise NotImplementedError(f"{name} ({kind.feature}) on a sharded sequence does not take {docs}: "
                                      "those are positions in the local shard. Pass packed documents as "
                                      "restarting position_ids (shard_batch's ring_documents)")
        if ctx.padding_between_documents:
            raise NotImplementedError(f"{name} ({kind.feature}) carries its state from one packed document into "
                                      "the next, and shard_batch padded a document to a multiple of 2 x ring_size "
                                      "before the next one: the padding would enter the next document's state. "
                                      "Call shard_batch(..., balance_documents=False) (plain zigzag, padding at the "
                                      "end of the row only), or pack documents whose lengths are multiples of "
                                      "2 x ring_size")
        bsz, s = hidden_states.shape[:2]
        lay = seq_layout(ctx.layout, ctx.documents, group=group, rank=dist.get_rank(group), size=size,
                         batch=bsz, local_len=s, device=hidden_states.device, ulysses_size=ulysses_size)
        if how == "heads":
            return kind.forward(self, hidden_states, lay)
        return _gather_forward(original, hidden_states, lay, kwargs)

    return forward


def _gather_forward(original: Callable, hidden_states: torch.Tensor, lay: SeqLayout, kwargs: dict):
    """The unpatched mixer on the whole sequence (gathered in order), then this rank's tokens."""
    out = original(gather_sequence(hidden_states, lay), cache=None, attention_mask=None, **kwargs)
    if isinstance(out, tuple):  # (hidden_states, extras...): only the first is per token
        return (local_tokens(out[0], lay), *out[1:])
    return local_tokens(out, lay)
