"""ring_generate equals the unpatched model.generate, token for token, on rings of 1, 2 and 3.

One spawn per ring size; every case runs inside it. Cases: tiny Llama (GQA 4/2 heads) and
Mistral (GQA + sliding window 12 < the 29-token prompt, so the window cuts through the
sharded cache), Llama with dynamic RoPE (its frequencies follow the sequence length, which
a shard alone does not know), batch 2, prompt lengths 29 and 2 (not multiples of 2C; at ring
3 a 2-token prompt leaves rank 2 with an empty cache shard), greedy and sampling, a model
passed in plain and one already patched; refusals (left padding, prompts or seeds that differ
across ranks, beam search) raise the same error on every rank.

Tolerances:
- fp32 logits of every step: relative error (norm over the batch and vocabulary) <= 2e-5.
  Both sides are fp32; the ring sums attention blocks in another order (and merges the
  decode partials through the log-sum-exp), which moves logits by ~1e-7 relative; a wrong
  position, window or missing cache entry moves them by 1e-2 or more.
- bf16: the prefill logits' error against the fp32 model must stay within 2x the unpatched
  bf16 model's error + 1e-3 (bf16 rounding noise); later steps are not compared because bf16
  may pick other tokens than fp32, after which logits are not comparable.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hf_ring_attention as hra
from dist_utils import run_ranks
from models import tiny_model, token_batch

NEW = 7  # new tokens: more than the ring size, so every rank stores decoded tokens


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _gather(obj, world):
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _dynamic_rope_llama():
    """Tiny Llama with dynamic NTK RoPE past its 16 positions: frequencies depend on the sequence length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


MODELS = {"llama": lambda: tiny_model("llama"), "mistral": lambda: tiny_model("mistral"),
          "llama-dynamic-rope": _dynamic_rope_llama}


def _greedy_case(family, n, batch, groups, world, patched):
    ids = token_batch(n, batch=batch)
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True,
              output_scores=True, eos_token_id=None, pad_token_id=None)
    ref = MODELS[family]().eval().generate(ids, **kw)
    model = MODELS[family]().eval()
    if patched:
        hra.apply_ring_attention(model, groups)
    out = hra.ring_generate(model, ids, groups, **kw)
    restored = model.config._attn_implementation == ("hf_ring" if patched else "sdpa") \
        and len(model._forward_pre_hooks) == int(patched) and len(model._forward_hooks) == 0
    positions = _gather(out.cache.positions.tolist(), world)  # global positions each rank's cache holds
    return dict(same_tokens=torch.equal(out.sequences, ref.sequences),
                logits_err=max(_rel(a, b) for a, b in zip(out.logits, ref.logits)),
                scores_err=max(_rel(a, b) for a, b in zip(out.scores, ref.scores)),
                steps=len(out.logits), restored=restored, positions=positions,
                cache_bytes=out.cache.nbytes(), prompt=n)


def _sampling_case(groups, world):
    ids = token_batch(29, batch=2)
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.0, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(1234)
    ref = tiny_model("mistral").eval().generate(ids, **kw)
    torch.manual_seed(1234)
    out = hra.ring_generate(tiny_model("mistral").eval(), ids, groups, **kw)
    return dict(tokens=_gather(out.tolist(), world), ref=ref.tolist())


def _bf16_case(groups):
    ids = token_batch(29, batch=2)
    kw = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True,
              eos_token_id=None, pad_token_id=None)
    fp32 = tiny_model("mistral").eval().generate(ids, **kw).logits[0]
    plain = tiny_model("mistral", dtype=torch.bfloat16).eval().generate(ids, **kw).logits[0]
    ring = hra.ring_generate(tiny_model("mistral", dtype=torch.bfloat16).eval(), ids, groups, **kw).logits[0]
    return _rel(ring, fp32), _rel(plain, fp32)


def _refusal(groups, rank, make):
    """Run one bad call; return (exception type, message) as this rank saw it."""
    model = tiny_model("llama").eval()
    ids, kw = make(rank)
    torch.manual_seed(kw.pop("_seed", 0))
    try:
        hra.ring_generate(model, ids, groups, max_new_tokens=2, **kw)
    except (ValueError, NotImplementedError) as exc:
        return type(exc).__name__, str(exc), model.config._attn_implementation
    return None, "no error", model.config._attn_implementation


REFUSALS = {
    "left_padding": (lambda rank: (token_batch(8), {"attention_mask": torch.tensor([[0, 0] + [1] * 6, [1] * 8])}),
                     "padding"),
    "different_prompts": (lambda rank: (token_batch(8, seed=rank), {}), "disagree on input_ids"),
    "different_seeds": (lambda rank: (token_batch(8), {"do_sample": True, "_seed": rank}), "disagree on rng_state"),
    "beam_search": (lambda rank: (token_batch(8), {"num_beams": 2}), "num_beams"),
}


def _run(rank, world):
    groups = hra.setup_groups(world)
    res = {"greedy": {}}
    for family, n, batch, patched in [("llama", 29, 2, False), ("mistral", 29, 2, True), ("llama", 2, 1, False),
                                      ("llama-dynamic-rope", 29, 1, False)]:
        res["greedy"][family, n, patched] = _greedy_case(family, n, batch, groups, world, patched)
    res["sampling"] = _sampling_case(groups, world)
    if world == 2:
        res["bf16"] = _bf16_case(groups)
    res["refusals"] = {name: _refusal(groups, rank, make) for name, (make, _) in REFUSALS.items()}
    ok = torch.ones(1)
    if world > 1:
        dist.all_reduce(ok)  # the ranks are still in step after every refusal
    res["in_step"] = ok.item() == world
    return res


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ring_generate_matches_generate(world):
    per_rank = run_ranks(_run, world, timeout=600)
    for rank, res in enumerate(per_rank):
        for case, r in res["greedy"].items():
            assert r["same_tokens"], (rank, case)
            assert r["steps"] == NEW
            assert r["logits_err"] < 2e-5 and r["scores_err"] < 2e-5, (rank, case, r["logits_err"], r["scores_err"])
            assert r["restored"], (rank, case)
            held = sorted(p for ps in r["positions"] for p in ps)
            # Every token but the last generated one is cached exactly once over the ring; padding is not.
            assert held == list(range(r["prompt"] + NEW - 1)), (case, r["positions"])
            if r["prompt"] > 2 * world:  # balanced: no rank holds more than its share plus the round robin's
                assert max(map(len, r["positions"])) <= -(-r["prompt"] // world) + -(-NEW // world) + 1
        tokens, ref = res["sampling"]["tokens"], res["sampling"]["ref"]
        assert all(t == tokens[0] for t in tokens), "ranks sampled different tokens"
        assert tokens[0] == ref, "sampling with the same seed differs from the unpatched generate"
        for name, (kind, message, attn) in res["refusals"].items():
            expected = REFUSALS[name][1]
            if world == 1 and name.startswith("different"):
                assert kind is None, (name, message)  # one rank agrees with itself
                continue
            assert kind is not None and expected in message, (name, message)
            assert (kind, message) == per_rank[0]["refusals"][name][:2], f"rank {rank} raised another error"
            assert attn == "sdpa", "a refused call must leave the model as it was"
        assert res["in_step"]
    if world == 2:
        ring, plain = per_rank[0]["bf16"]
        assert ring <= 2 * plain + 1e-3, f"bf16 prefill logits: ring {ring:.3g} vs unpatched bf16 {plain:.3g}"


def test_cache_refuses_use_outside_ring_generate():
    model = hra.apply_ring_attention(tiny_model("llama").eval())
    cache = hra.RingCache(model.config.num_hidden_layers)
    with pytest.raises(RuntimeError, match="outside ring_generate"):
        model(input_ids=token_batch(8), position_ids=torch.arange(8)[None], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=token_batch(8), position_ids=torch.arange(8)[None], use_cache=True)


def _run_ulysses(rank, world):
    groups = hra.setup_groups(1, ulysses_size=world)  # U = world, C = 1: the prefill's shards are Ulysses pieces
    return {(family, n): _greedy_case(family, n, 2, groups, world, True) for family, n in [("llama", 29), ("mistral", 7)]}


def test_ring_generate_ulysses():
    """Prefill through Ulysses (U = 2): the cache keeps each sp rank's piece, the last token's logits
    come from the sp rank that holds it; the tokens and logits are the unpatched generate's."""
    for rank, res in enumerate(run_ranks(_run_ulysses, 2, timeout=600)):
        for case, r in res.items():
            assert r["same_tokens"], (rank, case)
            assert r["logits_err"] < 2e-5 and r["scores_err"] < 2e-5, (rank, case, r["logits_err"], r["scores_err"])
            held = sorted(p for ps in r["positions"] for p in ps)
            assert held == list(range(r["prompt"] + NEW - 1)), (case, r["positions"])
