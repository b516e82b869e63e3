"""check_model refuses what the ring would compute wrongly, in words a user can act on; MLA is exact.

In-process (ring size 1) checks of the messages and of the unpatched state after a refusal; the
distributed proof that every other family is exact is tests/test_families.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_ring_attention as hra
from family_models import tiny_config, tiny_family_model
from models import token_batch


@pytest.mark.parametrize("family, features", [
    ("jamba", ["Mamba", "layer_types 'mamba'"]), ("falcon_h1", ["state-space", "FalconH1Mixer"]),
    ("nemotron_h", ["Mamba", "NemotronHMamba2Mixer"]), ("kimi_linear", ["gated delta-net", "KimiLinearDeltaAttention"]),
    ("minimax", ["lightning"]), ("recurrent_gemma", ["RG-LRU"]), ("rwkv", ["RWKV"]),
    ("llama4_text", ["chunked attention", "temperature tuning"]),
    ("deepseek_v32", ["indexer"]), ("gpt_oss", ["attention sinks", "s_aux"]),
    ("roberta", ["RoBERTa-style positions"]), ("bart", ["positions numbered locally"]),
    ("gemma2", ["attention logit softcapping"]), ("gemma3_text (use_bidirectional_attention)", ["bidirectional"]),
])
def test_refusal_names_feature_and_fix_and_leaves_model_unpatched(family, features):
    model = tiny_family_model(family)
    before = model.config._attn_implementation
    with pytest.raises(NotImplementedError) as err:
        hra.apply_ring_attention(model)
    msg = str(err.value)
    assert type(model).__name__ in msg and "run the model unpatched" in msg, msg
    for feature in features:
        assert feature in msg, msg
    assert model.config._attn_implementation == before and not hasattr(model, "_hf_ring_saved")
    assert not model._forward_pre_hooks and not any(hasattr(m, "_hf_ring_state") for m in model.modules())
    hra.remove_ring_attention(model)  # a no-op
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_text", "lfm2", "lfm2_moe", "bamba", "granitemoehybrid"])
def test_mixers_made_exact_are_not_refused(family):
    """The mixers hf_ring_attention.mixers makes exact (tests/test_mixers.py), their Conv1d and layer types."""
    assert hra.compat.unsupported_features(tiny_family_model(family)) == []


def test_exact_mixer_does_not_hide_other_features():
    """Skipping a handled mixer skips only it: an unhandled feature beside it is still refused."""
    model = tiny_family_model("lfm2")
    model.config.attn_logit_softcapping = 30.0
    model.model.layers[0].extra = torch.nn.Conv1d(4, 4, 3)  # a convolution outside the handled mixer
    whats = [what for what, _ in hra.compat.unsupported_features(model)]
    assert any("softcapping" in w for w in whats) and any("Conv1d" in w and "layers.0.extra" in w for w in whats), \
        whats
    model.model.layers[0].conv = torch.nn.Identity()  # a 'conv' layer without its mixer: the type is refused
    whats = [what for what, _ in hra.compat.unsupported_features(model)]
    assert any("layer_types 'conv'" in w for w in whats), whats


def test_encoders_and_vision_towers_refused_as_bidirectional():
    from transformers import BertLMHeadModel, Gemma3ForConditionalGeneration

    config = tiny_config("bert")
    config.is_decoder = False  # BERT as an encoder
    with pytest.raises(NotImplementedError, match="bidirectional self-attention"):
        hra.apply_ring_attention(BertLMHeadModel(config))
    with pytest.raises(NotImplementedError, match="SiglipAttention"):  # the image tower of a VLM
        hra.apply_ring_attention(Gemma3ForConditionalGeneration(tiny_config("gemma3")))


def test_attention_kwarg_refusal_shows_shape_not_values():
    model = hra.apply_ring_attention(tiny_family_model("llama"))
    q = torch.randn(1, 4, 8, 16)
    sinks = torch.full((4,), 0.123456)
    with pytest.raises(NotImplementedError) as err:
        hra.integration.ring_attention_forward(model.model.layers[0].self_attn, q, q, q, None, s_aux=sinks)
    msg = str(err.value)
    assert "attention sinks" in msg and "s_aux" in msg and "shape (4,)" in msg, msg
    assert "tensor(" not in msg and "0.123" not in msg, msg


@pytest.mark.parametrize("dqk, dv", [(24, 16), (16, 24)])
def test_match_head_dims_is_exact(dqk, dv):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 16, dqk, generator=g), torch.randn(2, 2, 16, dqk, generator=g)
    v = torch.randn(2, 2, 16, dv, generator=g)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    qp, kp, vp, width = hra.compat.match_head_dims(q, k, v)
    out = hra.ring_attention(qp, kp, vp, scale=dqk ** -0.5)[..., :width]
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)  # fp32, two kernels' summation orders


def test_mla_model_patched_equals_unpatched():
    """DeepSeek-V3 (q/k head dim 24, value head dim 16) through the patched attention, ring size 1."""
    model = tiny_family_model("deepseek_v3")
    ids = token_batch(16)
    ref = model(input_ids=ids, use_cache=False).logits
    hra.apply_ring_attention(model)
    out = model(input_ids=ids, position_ids=torch.arange(16)[None]).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=2e-5)
