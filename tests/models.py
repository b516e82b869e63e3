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
