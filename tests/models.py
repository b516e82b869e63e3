"""Tiny randomly initialised Llama / Mistral models built from configs in code (no downloads)."""

from __future__ import annotations

import torch


def tiny_model(family: str = "llama", *, seed: int = 0, sliding_window: int | None = 12, layers: int = 2,
               dtype=torch.float32, **config):
    """A tiny random model; ``config``: extra config values (e.g. rope_parameters, tie_word_embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  attention_dropout=0.0, tie_word_embeddings=False)
    common.update(config)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa"))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=sliding_window, attn_implementation="sdpa"))
    else:
        raise ValueError(family)
    return model.to(dtype)


def token_batch(n: int, *, batch: int = 2, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


HYBRIDS = ("qwen3_next", "qwen3_5", "lfm2", "bamba", "granitemoehybrid")


def tiny_hybrid(family: str, *, seed: int = 0, dtype=torch.float32, **config):
    """A tiny random model whose layers mix tokens outside attention, beside attention layers.

    ``config``: config values replacing the defaults below. Head counts are chosen so that rings of
    2 and 3 split them unevenly or across B/C groups (Bamba: 8 heads in 2 groups; at ring 3 the
    middle rank's heads 2, 3, 4 straddle both groups unevenly).
    """
    import transformers as tf

    cfg = dict(vocab_size=96, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=1024, attention_dropout=0.0, tie_word_embeddings=False,
               num_hidden_layers=3, attn_implementation="sdpa")
    mamba = dict(hidden_size=48, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8)
    if family in ("qwen3_next", "qwen3_5"):
        cfg.update(hidden_size=64, head_dim=16, linear_num_key_heads=4, linear_num_value_heads=8,
                   linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                   layer_types=["linear_attention", "full_attention", "linear_attention"])
        if family == "qwen3_next":
            cfg.update(num_experts=0)
        make = (tf.Qwen3NextForCausalLM, tf.Qwen3NextConfig) if family == "qwen3_next" else \
            (tf.Qwen3_5ForCausalLM, tf.Qwen3_5TextConfig)
    elif family == "lfm2":
        cfg.update(hidden_size=64, conv_L_cache=3, layer_types=["conv", "full_attention", "conv"])
        make = (tf.Lfm2ForCausalLM, tf.Lfm2Config)
    elif family == "bamba":
        cfg.update(mamba, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=12, mamba_n_groups=2)
        make = (tf.BambaForCausalLM, tf.BambaConfig)
    elif family == "granitemoehybrid":
        cfg.update(mamba, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=24,
                   mamba_n_groups=1, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64)
        make = (tf.GraniteMoeHybridForCausalLM, tf.GraniteMoeHybridConfig)
    else:
        raise ValueError(family)
    cfg.update(config)
    torch.manual_seed(seed)
    model = make[0](make[1](**cfg))
    for m in model.modules():  # the init's tiny conv weights would hide a wrong halo in rounding noise
        if isinstance(m, torch.nn.Conv1d):
            torch.nn.init.normal_(m.weight, std=0.5)
    return model.to(dtype)
