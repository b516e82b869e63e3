"""Tiny random models of every installed transformers causal-LM family (no downloads).

``tiny_family_model(family)`` shrinks the family's default config (sizes, experts, layer
pattern) and builds the ``MODEL_FOR_CAUSAL_LM_MAPPING`` class from it. Families that are not
plain text decoders (they need images, audio or an encoder's states) are listed in
``NOT_TEXT_DECODERS`` with the reason; ``OVERRIDES`` holds the per-family settings the
generic shrink cannot guess (e.g. which layers of a hybrid are attention).
"""

from __future__ import annotations

import inspect

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 128
WINDOW = 6  # sliding windows / local attention spans: shorter than the swept sequences

# Families whose causal-LM class is not a plain text decoder: skipped by name.
_VLM = "vision-language wrapper (needs pixel inputs for its vision tower); its text decoder is swept as {}"
NOT_TEXT_DECODERS = {
    "gemma3": _VLM.format("gemma3_text"), "gemma3n": _VLM.format("gemma3n_text") + " (also audio)",
    "gemma4": _VLM.format("gemma4_text"), "gemma4_unified": _VLM.format("gemma4_unified_text"),
    "llama4": _VLM.format("llama4_text"), "qwen3_5": _VLM.format("qwen3_5_text"),
    "qwen3_5_moe": _VLM.format("qwen3_5_moe_text"), "qwen4_exp": _VLM.format("qwen4_exp_text"),
    "dots3_note": _VLM.format("dots3_note_text") + " (also audio)",
    "fuyu": "image-text model (image patches enter as embeddings); its decoder is Persimmon, swept as persimmon",
    "got_ocr2": _VLM.format("qwen2"),
    "git": "image-to-text model: image tokens attend bidirectionally ahead of the causal text",
    "phi4_multimodal": "vision + audio model with LoRA adapters on a Phi-3-like decoder (swept as phi3)",
    "gemma4_assistant": "speculative-decoding drafter: its inputs are the target model's hidden states and KV",
    "gemma4_unified_assistant": "speculative-decoding drafter: its inputs are the target model's hidden states and KV",
    "moshi": "speech-text model: text and audio-codebook streams with a depth decoder",
    "moss_transcribe_diarize": "speech-to-text model: the decoder reads audio encoder states",
    "musicgen": "audio-codebook decoder: input_ids of shape (batch * codebooks, length) and delay patterns",
    "musicgen_melody": "audio-codebook decoder: input_ids of shape (batch * codebooks, length) and delay patterns",
    "whisper": "speech decoder: cross-attention to the audio encoder's states",
}

_MAMBA_HEADS = 2 * HIDDEN // 16  # expand 2, mamba head dim 16

# Per-family config settings applied after the generic shrink.
OVERRIDES = {
    # hybrids whose default (or shrunk) layer pattern has no token mixer, or one of a single kind
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "jamba": {"num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": _MAMBA_HEADS},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": _MAMBA_HEADS},
    "falcon_h1": {"mamba_n_heads": _MAMBA_HEADS},
    "nemotron_h": {"mamba_num_heads": _MAMBA_HEADS, "n_groups": 1},
    "mamba2": {"num_heads": _MAMBA_HEADS, "n_groups": 1},
    "zamba": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "num_hidden_layers": 4,
              "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS, "n_mamba_heads": 2},
    "rwkv": {"attention_hidden_size": HIDDEN},
    "nemotron": {"num_key_value_heads": KV_HEADS},
    "zamba2": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "num_hidden_layers": 4,
               "n_mamba_heads": _MAMBA_HEADS},
    "zaya": {"num_experts_per_tok": 1},
    "mllama": {"text_config": {"cross_attention_layers": [1]}},  # keep one of its image cross-attention layers
    "longcat_flash": {"num_layers": 2},
    "xlnet": {"d_inner": FFN},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "dots3_note_text": {"swa_num_attention_heads": HEADS, "swa_num_key_value_heads": HEADS, "swa_q_lora_rank": 32,
                        "swa_kv_lora_rank": 32, "swa_head_dim": 24, "swa_qk_nope_head_dim": 16,
                        "swa_v_head_dim": 16},
    # MoE defaults left unset
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "dbrx": {"d_model": HIDDEN, "n_heads": HEADS, "n_layers": 2,
             "attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"hidden_size": HIDDEN, "ffn_hidden_size": FFN, "moe_num_experts": 4, "moe_top_k": 2}},
    # partial rotary dims, per-layer sizes, side vocabularies
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "gemma4_text": {"global_head_dim": HEAD_DIM}, "gemma4_unified_text": {"global_head_dim": HEAD_DIM},
    "inkling_text": {"unpadded_vocab_size": VOCAB}, "inkling2_text": {"unpadded_vocab_size": VOCAB},
    "inkling2_loop_text": {"unpadded_vocab_size": VOCAB},
    "roc_bert": {"shape_vocab_size": 32, "pronunciation_vocab_size": 32, "shape_embed_dim": 16,
                 "pronunciation_embed_dim": 16},
    "rembert": {"input_embedding_size": 32, "output_embedding_size": HIDDEN},
    "cpmant": {"dim_head": HEAD_DIM, "dim_ff": FFN},
    "ctrl": {"dff": FFN},
    "xmod": {"default_language": "en_XX"},
    "reformer": {"is_decoder": True, "axial_pos_embds": False},
    "prophetnet": {"num_decoder_layers": 2, "num_encoder_layers": 1, "num_decoder_attention_heads": HEADS,
                   "num_encoder_attention_heads": HEADS},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
                       "indexer_budget": 8, "indexer_compress_ratio": 2, "ngram_vocab_size_base": VOCAB,
                       "split_ngram_parts": 4},
}

_SIZES = {  # attribute -> tiny value, set where the default config has an int there
    "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": HEADS, "head_dim": HEAD_DIM,
    "vocab_size": VOCAB, "max_position_embeddings": 256,
    # MoE
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32, "shared_experts_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "moe_shared_expert_intermediate_size": 32, "intermediate_size_mlp": FFN, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "zero_expert_num": 2, "router_hidden_size": 32,
    # MLA (DeepSeek-V2/V3): q/k head dim 24, value head dim 16
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24, "o_lora_rank": 32,
    # sparse-attention indexers: top-k smaller than the sequence, so selection matters
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4, "index_block_size": 4, "index_topk_blocks": 2,
    # state-space / linear attention
    "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_chunk_size": 8, "mamba_d_ssm": 2 * HIDDEN,
    "mamba_dt_rank": 8, "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_headdim": 16, "ssm_state_size": 8,
    "state_size": 8, "time_step_rank": 8, "chunk_size": 8, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_head_dim": 16,
    "linear_num_heads": 4, "lru_width": HIDDEN,
    "block_size": 8,
    # windows and chunks
    "sliding_window": WINDOW, "sliding_window_size": WINDOW, "attention_window_size": WINDOW,
    "local_attention": WINDOW, "window_size": WINDOW, "attention_chunk_size": 8, "local_attention_window_len": WINDOW,
    # others
    "swa_num_attention_heads": HEADS, "swa_head_dim": HEAD_DIM, "swa_num_key_value_heads": KV_HEADS,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB, "laurel_rank": 8,
    "kv_channels": 16, "adapter_rank": 8, "embedding_size": HIDDEN, "ffn_hidden_size": FFN,
    "dim_model_base": HIDDEN, "word_embed_proj_dim": HIDDEN, "d_rel": 4, "rel_extent": 32,
    "hidden_size_global": HIDDEN, "encoder_hash_byte_group_vocab": 64, "cross_attn_k": 1,
    "loop_gate_rank": 8, "gated_norm_rank": 4, "hc_lowrank": 8, "ple_embed_dim": 16,
    # encoder-decoder families (their causal-LM class is the decoder alone) and older names
    "decoder_attention_heads": HEADS, "encoder_attention_heads": HEADS, "decoder_ffn_dim": FFN,
    "encoder_ffn_dim": FFN, "decoder_layers": 2, "encoder_layers": 1, "ffn_dim": FFN, "rotary_dim": 8,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
              "decoder_start_token_id")


def _layer_pick(types: list) -> list[int]:
    """Layers to keep: the first layer of every type (at least two layers)."""
    first = {}
    for i, t in enumerate(types):
        first.setdefault(t, i)
    keep = sorted(first.values())
    if len(keep) < 2:
        keep = sorted({*keep, *range(min(2, len(types)))})
    return keep


def _settable(cls, name: str) -> bool:
    return not isinstance(inspect.getattr_static(cls, name, None), property)


def _get(config, name: str):
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - per-layer attributes raise on global access: read the stored value
        return vars(config).get(name)


def shrink(cls, base, overrides: dict | None = None):
    """A config of class ``cls`` like ``base`` with tiny sizes, truncated layer lists and no dropout."""
    kw, overrides = {}, dict(overrides or {})
    for name, value in _SIZES.items():
        cur = _get(base, name)
        if (isinstance(cur, int) and not isinstance(cur, bool) and cur > 0) or (
                name == "head_dim" and cur is None and name in vars(base)):
            kw[name] = value
        elif isinstance(cur, list) and name == "intermediate_size":
            kw[name] = value
    if isinstance(_get(base, "qk_rope_head_dim"), int) and _get(base, "head_dim") == base.qk_rope_head_dim:
        kw["head_dim"] = _SIZES["qk_rope_head_dim"]  # MLA configs use head_dim for the rotary part
    kv, heads = _get(base, "num_key_value_heads"), _get(base, "num_attention_heads")
    if isinstance(kv, int) and isinstance(heads, int):
        kw["num_key_value_heads"] = KV_HEADS if kv < heads else HEADS
    for name in _TOKEN_IDS:
        cur = _get(base, name)
        if isinstance(cur, int) and cur >= VOCAB:
            kw[name] = 0 if name == "pad_token_id" else min(cur, 3)
        elif isinstance(cur, list):
            kw[name] = [1]
    layers, types = _get(base, "num_hidden_layers"), _get(base, "layer_types")
    if isinstance(layers, int):
        keep = _layer_pick(list(types)) if isinstance(types, (list, tuple)) and len(types) == layers else [0, 1]
        kw["num_hidden_layers"] = len(keep)
        for name, value in vars(base).items():  # per-layer lists: keep the same layers
            if isinstance(value, (list, tuple)) and len(value) == layers and name != "intermediate_size":
                kw[name] = [value[i] for i in keep]
    for name, value in vars(base).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type") and name != "quantization_config":
            # sub-configs (e.g. BLT's patcher, a text_config), with their own overrides
            kw[name] = shrink(type(value), value, overrides.pop(name, None)).to_dict()
        if ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
            kw[name] = 0.0
    if vars(base).get("is_decoder") is False and not vars(base).get("is_encoder_decoder"):
        kw["is_decoder"] = True  # the causal-LM use of BERT-style families (refusing is_decoder=False: test_compat)
    kw.update(overrides)
    alias = getattr(cls, "attribute_map", {}) or {}
    kw = {alias.get(k, k): v for k, v in kw.items()}
    return cls(**{k: v for k, v in kw.items() if _settable(cls, k)})


# Settings beyond the default config that the sweep also checks: name -> (family, config settings).
VARIANTS = {
    "qwen2 (mixed sliding layers)": ("qwen2", {"use_sliding_window": True, "max_window_layers": 1,
                                               "sliding_window": WINDOW,
                                               "layer_types": ["full_attention", "sliding_attention"]}),
    "gemma2 (attn_logit_softcapping=None)": ("gemma2", {"attn_logit_softcapping": None}),
    "gemma3_text (use_bidirectional_attention)": ("gemma3_text", {"use_bidirectional_attention": True}),
}


def tiny_config(name: str):
    """The default config of a family (or a ``VARIANTS`` name) with tiny sizes (see the module docstring)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family, extra = VARIANTS.get(name, (name, {}))
    cls = CONFIG_MAPPING[family]
    return shrink(cls, cls(), {**OVERRIDES.get(family, {}), **extra})


def tiny_family_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised fp32 model of a family or ``VARIANTS`` name, in eval mode (same seed, same weights).

    Parameters a family initialises to zero (gates, residual projections) get small random
    values, so that no token-mixing path is switched off by its initialisation.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = tiny_config(name)
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not isinstance(config, model_cls.config_class) and hasattr(config, "text_config"):
        config = config.text_config  # e.g. Emu3ForCausalLM: the text decoder of a multimodal config
    torch.manual_seed(seed)
    model = model_cls(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.float().eval()
