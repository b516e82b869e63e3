"""Which models ring attention is exact for; ``check_model`` refuses the others before anything is patched.

Ring attention is exact when (1) everything that mixes tokens is causal self-attention going
through transformers' ``AttentionInterface``, (2) every position the model uses is the global
one (from ``position_ids``), and (3) the attention is softmax(q k^T * scale) v with at most a
causal mask, a sliding window and document boundaries. A model breaking any of these runs
without an error and gives silently wrong results on a ring (each rank would mix only its own
shard), so ``apply_ring_attention`` refuses it with ``NotImplementedError`` naming the feature.

Features are found in the config (layer types, feature flags) AND in the module tree (class
names of token mixers, convolutions, sink parameters, bidirectional modules), so a family not
known by name is still caught by what it contains. Token mixers that ``hf_ring_attention.mixers``
makes exact (``mixers.MIXERS``: gated delta-net, Mamba2, LFM2's short convolutions) are not
features: their modules (and everything inside them) and the config layer types whose every layer
holds one (``mixers.exact_layer_types``) are skipped, so only the other mixers are refused.
``tests/test_families.py`` sweeps every installed causal-LM family against the unpatched model;
its table is ``docs/families.md``.
"""

from __future__ import annotations

import inspect
import re

import torch

from .mixers import MIXERS, exact_layer_types

# What to do instead, by kind of feature.
_MIXES = ("it mixes tokens outside attention, so each rank would mix only its own shard; not supported yet "
          "(hf_ring_attention.mixers makes only gated delta-net, Mamba2 and LFM2 short convolutions exact: "
          "add the class to mixers.MIXERS with an exact sharded forward); run the model unpatched")
_UNPATCHED = "not supported yet; run the model unpatched (without apply_ring_attention)"
_CAUSAL = "ring attention is causal self-attention only; run the model unpatched"

# Layer types that are exact on the ring (attention types, and per-token MLP / MoE blocks).
_EXACT_LAYER_TYPES = {"full_attention", "sliding_attention", "attention", "mlp", "moe", "dense", "sparse"}
_LAYER_TYPES = {  # known layer type -> (what it is, fix)
    "linear_attention": ("linear-attention / state-space layers (Mamba, gated delta-net, lightning attention)",
                         _MIXES),
    "mamba": ("Mamba (state-space) layers", _MIXES),
    "conv": ("short-convolution layers", _MIXES),
    "hybrid": ("hybrid layers (attention beside a state-space or convolution mixer)", _MIXES),
    "hybrid_sliding": ("hybrid layers (attention beside a state-space or convolution mixer)", _MIXES),
    "chunked_attention": ("chunked attention (attention_chunk_size: queries see only keys of their chunk, a "
                          "mask the ring does not build)", _UNPATCHED),
    "indexed_attention": ("sparse attention whose top-k key indexer scores the whole sequence (DeepSeek sparse "
                          "attention)", _MIXES),
    "compressed_sparse_attention": ("compressed attention (keys pooled over blocks of tokens)", _MIXES),
    "heavily_compressed_attention": ("compressed attention (keys pooled over blocks of tokens)", _MIXES),
}
# CamelCase words of module class names that mark a token mixer outside attention.
_MIXER_WORDS = {
    "mamba": "Mamba (state-space) layers", "ssm": "state-space layers", "mixer": "state-space mixer layers",
    "delta": "gated delta-net layers (linear attention recurrence)", "lightning": "lightning (linear) attention",
    "rwkv": "RWKV time-mixing layers", "rglru": "RG-LRU recurrent layers", "lstm": "xLSTM recurrent layers",
    "conv": "short-convolution layers", "convolution": "short-convolution layers",
    "cca": "compressed convolutional attention (CCA)", "retention": "retention layers",
    "hyena": "Hyena long convolutions", "indexer": "a top-k key indexer over the whole sequence (sparse attention)",
    "compressor": "compressed attention (keys pooled over blocks of tokens)", "patcher": "entropy-based byte patching",
}
_MIXER_PAIRS = {("linear", "attention"): "linear attention layers",
                ("relative", "position"): "relative position biases (added to the attention logits)"}
_CROSS = "cross-attention (keys from another sequence: encoder or image states, which the ring does not shard)"
_QUERY_PROJECTIONS = ("q_proj", "query", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "q_a_proj")
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")


def unsupported_features(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Features of ``model`` that ring attention would compute wrongly, each as (what and where, fix).

    An empty list means the model is believed exact on the ring (``tests/test_families.py`` checks
    that for every installed family).
    """
    found: dict[str, tuple[list[str], str]] = {}  # what -> (where it was seen, fix), in the order found
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    configs = {id(c): c for c in (config, text) if c is not None}.values()
    exact = exact_layer_types(model)  # layer types whose mixers install_mixers makes exact
    for what, where, fix in (*(f for c in configs for f in _config_features(c, exact)), *_module_features(model),
                             *_position_features(model)):
        wheres, _ = found.setdefault(what, ([], fix))
        example = where.startswith("e.g.")
        if where not in wheres and not (example and any(w.startswith("e.g.") for w in wheres)):
            wheres.append(where)  # every config source, one module example
    return [(f"{what} ({'; '.join(wheres)})" if wheres else what, fix) for what, (wheres, fix) in found.items()]


def check_model(model: torch.nn.Module) -> None:
    """Refuse models on which ring attention would be silently wrong (nothing is changed on the model).

    Args:
        model: a transformers ``PreTrainedModel``.

    Raises:
        NotImplementedError: naming the family, every feature found (where) and its fix.
    """
    features = unsupported_features(model)
    if features:
        config = getattr(model, "config", None)
        family = f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"
        raise NotImplementedError(
            f"ring attention would be silently wrong for {family}: each rank holds a shard of the sequence, "
            "and these parts of the model would see only that shard or local positions:\n"
            + "\n".join(f"- {what}: {fix}" for what, fix in features))


def match_head_dims(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Zero-pad q/k or v to one head dim, so that MLA (value head dim != q/k head dim) is exact on the ring.

    The ring sends K and V with one shape. Zero columns of V give zero output columns (slice them
    off); zero columns of q and k add nothing to q.k (the caller keeps the unpadded softmax scale).
    transformers pads V the same way for flash attention in DeepSeek-V3.

    Args:
        query: (B, Hq, S, Dqk); key: (B, Hkv, S, Dqk); value: (B, Hkv, S, Dv).

    Returns:
        (query, key, value) with the head dim max(Dqk, Dv), and Dv.
    """
    dqk, dv = query.shape[-1], value.shape[-1]
    if dv < dqk:
        value = torch.nn.functional.pad(value, (0, dqk - dv))
    elif dv > dqk:
        query, key = (torch.nn.functional.pad(t, (0, dv - dqk)) for t in (query, key))
    return query, key, value, dv


def _layer_types(cfg) -> list[str]:
    types = []
    for name in ("layer_types", "layers_block_type"):
        try:
            value = getattr(cfg, name, None)
        except Exception:  # noqa: BLE001 - some configs raise on global access of per-layer attributes
            value = vars(cfg).get(name)
        if isinstance(value, (list, tuple)):
            types += [v for v in value if isinstance(v, str)]
    return types


def _config_features(cfg, exact_types: set[str] = frozenset()):
    """(what, where, fix) for the features a config declares (layer types in ``exact_types`` are exact)."""
    g = vars(cfg).get  # raw values: no per-layer access errors
    types = set(_layer_types(cfg))
    for t in sorted(types - _EXACT_LAYER_TYPES - exact_types):
        what, fix = _LAYER_TYPES.get(t, (f"layers of type {t!r}, not known to be exact on the ring", _MIXES))
        yield what, f"layer_types {t!r}", fix
    if g("attention_chunk_size") is not None and not types:
        yield _LAYER_TYPES["chunked_attention"][0], "attention_chunk_size", _UNPATCHED
    if g("attn_temperature_tuning") and 0 in (g("no_rope_layers") or [0]):
        yield ("attention temperature tuning on NoPE layers (the query scale comes from local positions "
               "0..S_local-1)", "attn_temperature_tuning", _UNPATCHED)
    if g("attn_logit_softcapping") is not None:
        yield "attention logit softcapping", "attn_logit_softcapping", _UNPATCHED
    if g("keep_window_size") is not None:
        yield "dynamic mask attention (a learned per-key mask with top-k key selection)", "keep_window_size", \
            _UNPATCHED
    if g("encoder_hash_byte_group_size") is not None or g("patching_mode") is not None:
        yield "byte patching and hash n-gram embeddings (BLT)", "patching_mode", _MIXES
    if g("is_encoder_decoder"):
        yield "an encoder-decoder model", "is_encoder_decoder", _CAUSAL
    if g("is_causal") is False or g("use_bidirectional_attention") in (True, "all"):
        yield "bidirectional attention", "is_causal / use_bidirectional_attention", _CAUSAL


def _module_features(model):
    """(what, where, fix) for the first module of each feature (nothing from inside a module found, nor
    from inside a mixer ``install_mixers`` makes exact: its own Conv1d is part of it)."""
    from transformers import PreTrainedModel

    inside = ()
    for name, module in model.named_modules():
        if name.startswith(inside) or isinstance(module, PreTrainedModel):  # their names are the family's
            continue
        if type(module).__name__ in MIXERS:
            inside = (*inside, name + ".")
            continue
        found = _module_feature(name, module)
        if found is not None:
            inside = (*inside, name + ".")
            yield found[0], f"e.g. {name}: {type(module).__name__}", found[1]


def _module_feature(name: str, module: torch.nn.Module) -> tuple[str, str] | None:
    cls = type(module)
    words = [w.lower() for w in _WORD.findall(cls.__name__)]
    if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.RNNBase)):
        return f"torch {cls.__name__} layers (mixing neighbouring positions)", _MIXES
    if cls.__module__ != "transformers.pytorch_utils":  # its Conv1D is a linear layer (GPT-2)
        for w in words:
            if w in _MIXER_WORDS:
                return _MIXER_WORDS[w], _MIXES
    for pair, what in _MIXER_PAIRS.items():
        if pair in zip(words, words[1:]):
            return what, _MIXES
    if ("cross", "attention") in zip(words, words[1:]):
        return _CROSS, _CAUSAL
    if callable(getattr(module, "create_position_ids_from_input_ids", None)):
        return ("RoBERTa-style positions (numbered from padding_idx + 1, derived from input_ids; shard_batch's "
                "position_ids count from 0)", _UNPATCHED)
    if torch.is_tensor(getattr(module, "sinks", None)):
        return "attention sinks (a learned per-head softmax logit, the attention kwarg s_aux)", _UNPATCHED
    if getattr(module, "is_causal", None) is False and any(hasattr(module, p) for p in _QUERY_PROJECTIONS):
        if getattr(module, "is_cross_attention", False) or "encoder_attn" in name or "cross" in name:
            return _CROSS, _CAUSAL
        return ("bidirectional self-attention (is_causal=False: an encoder, or BERT-style with is_decoder=False)",
                _CAUSAL + " (or set config.is_decoder=True for a BERT-style decoder)")
    return None


def _position_features(model):
    """Positions: the model must take the global ``position_ids`` that shard_batch gives it."""
    base = getattr(model, "base_model", model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return
    if "position_ids" not in params:
        yield ("positions numbered locally (every rank would count its shard from 0)",
               f"{type(base).__name__}.forward takes no position_ids", _UNPATCHED)
