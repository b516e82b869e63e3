"""The patched model on zigzag shards equals the unpatched model on the full sequence.

Tiny Llama (GQA) and Mistral (GQA + sliding window 12 < sequence) models, ring sizes 2 and 4.
Each rank's loss is scaled for DDP (see shard_batch), so the ring's loss is the mean of the
per-rank losses and the gradient of every parameter is the mean of the per-rank gradients
(what DDP's all-reduce computes).

Tolerances:
- fp32: 2e-5 relative (loss, logits, every parameter gradient). Both sides are fp32 with
  different summation orders; we measure <= 1e-6, while a wrong mask, position or shard
  moves results by O(1e-2) or more.
- bf16: the relative error (norm over all parameters) of the ring against the fp32 unpatched
  model must stay within 2x that of the unpatched bf16 model + 1e-3 (bf16 rounding noise).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hf_ring_attention as hra
from dist_utils import run_ranks
from models import tiny_model, token_batch


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class _CountingComm(hra.comm.RingComm):
    """RingComm that records the pass tag of every ring pass it serves (3 * layer + direction)."""

    tags: list[int] = []

    def __init__(self, group, *, timeout=None, tag=0):
        super().__init__(group, timeout=timeout, tag=tag)
        _CountingComm.tags.append(tag)


def _ring_step(model, ids, groups, world, ckpt):
    _CountingComm.tags = []
    # transformers' own loss: these tests compare logits (tests/test_loss.py covers the chunked loss)
    options = hra.RingOptions(comm=_CountingComm)
    hra.apply_ring_attention(model, groups, options=options, loss_chunk_size=None)
    hra.apply_ring_attention(model, groups, options=options, loss_chunk_size=None)  # idempotent
    if ckpt:
        model.gradient_checkpointing_enable()
    out = model(**hra.shard_batch({"input_ids": ids, "labels": ids}, groups))
    out.loss.backward()
    forward_passes = [t // 3 for t in _CountingComm.tags if t % 3 == hra.ring.FWD_KV]
    layers = model.config.num_hidden_layers
    # With checkpointing the backward recomputes every layer's forward, ring included.
    assert sorted(forward_passes) == sorted(list(range(layers)) * (2 if ckpt else 1)), forward_passes
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=groups.ring_group)
    grads = []
    for p in model.parameters():
        g = p.grad.float().clone()
        dist.all_reduce(g, group=groups.ring_group)
        grads.append(g / world)
    logits = hra.zigzag_unshard(out.logits.detach(), dim=1, group=groups.ring_group)
    return loss / world, logits[:, :ids.shape[1]], grads


def _compare(rank, world, family, dtype):
    groups = hra.setup_groups(world)
    ids = token_batch(2 * world * 8 - 3)  # not a multiple of 2 * ring: shard_batch pads
    ref = tiny_model(family).train()
    ref_out = ref(input_ids=ids, labels=ids, use_cache=False)
    ref_out.loss.backward()
    ref_grads = [p.grad for p in ref.parameters()]
    results = {}
    for ckpt in (False, True):
        model = tiny_model(family, dtype=dtype).train()
        loss, logits, grads = _ring_step(model, ids, groups, world, ckpt)
        results[ckpt] = (abs(loss.item() - ref_out.loss.item()) / ref_out.loss.item(),
                         _rel(logits, ref_out.logits.detach()),
                         _rel(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])))
    base = None
    if dtype == torch.bfloat16:  # the unpatched model's own bf16 error: the budget
        lo = tiny_model(family, dtype=dtype).train()
        o = lo(input_ids=ids, labels=ids, use_cache=False)
        o.loss.backward()
        base = (abs(o.loss.item() - ref_out.loss.item()) / ref_out.loss.item(), _rel(o.logits.detach(), ref_out.logits),
                _rel(torch.cat([p.grad.flatten() for p in lo.parameters()]), torch.cat([g.flatten() for g in ref_grads])))
    return results, base


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("world", [2, 4])
def test_patched_model_matches_unpatched_fp32(family, world):
    results, _ = run_ranks(_compare, world, family, torch.float32)[0]
    for ckpt, errs in results.items():
        assert max(errs) < 2e-5, f"checkpointing={ckpt}: relative errors (loss, logits, grads) = {errs}"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_patched_model_bf16_within_twice_unpatched_bf16(family):
    results, base = run_ranks(_compare, 2, family, torch.bfloat16)[0]
    for ckpt, errs in results.items():
        for name, e, b in zip(("loss", "logits", "grads"), errs, base):
            assert e <= 2 * b + 1e-3, f"checkpointing={ckpt} {name}: ring bf16 {e:.3g} vs unpatched bf16 {b:.3g}"


ROPES = {  # max_position_embeddings 16 < every length below, so the scaled frequencies are in use
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5 + i for i in range(8)],
                 "original_max_position_embeddings": 16, "rope_theta": 10000.0},
}


def _dynamic_rope(rank, world):
    """Dynamic / longrope RoPE pick frequencies from max(position_ids) + 1: the ring must see the whole
    sequence's largest position (not its shard's, nor the padding's), with and without gradients."""
    groups = hra.setup_groups(world)
    ids = token_batch(2 * world * 6 - 1, batch=1)  # padded to a multiple of 2 * ring
    errs = {}
    for name, rope in ROPES.items():
        make = lambda: tiny_model("llama", rope_parameters=rope, max_position_embeddings=16)  # noqa: E731
        for grad in (False, True):
            ref = make()  # fresh models: dynamic RoPE keeps the longest length it has seen
            with torch.set_grad_enabled(grad):
                want = ref(input_ids=ids, use_cache=False).logits
                model = hra.apply_ring_attention(make(), groups)
                got = model(**hra.shard_batch({"input_ids": ids}, groups)).logits
            got = hra.zigzag_unshard(got.detach(), dim=1, group=groups.ring_group)[:, :ids.shape[1]]
            errs[(name, grad)] = _rel(got, want.detach())
    return errs


def test_dynamic_and_longrope_rope_exact_with_and_without_gradients():
    # fp32 on both sides, different summation orders (measured ~1e-7); RoPE from a shard's own
    # largest position moves logits by >1e-2.
    for rank_errs in run_ranks(_dynamic_rope, 2):
        assert max(rank_errs.values()) < 2e-5, rank_errs


def test_remove_restores_and_generate_works():
    model = tiny_model("mistral").eval()
    ids = token_batch(16, batch=1)
    before = model(input_ids=ids).logits
    hra.apply_ring_attention(model)
    assert model.config._attn_implementation == "hf_ring"
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids, use_cache=True)
    torch.testing.assert_close(model(input_ids=ids, position_ids=torch.arange(16)[None]).logits, before,
                               atol=1e-5, rtol=1e-5)
    hra.remove_ring_attention(model)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 19)


@pytest.mark.parametrize("call, match", [
    (lambda m, ids: m(input_ids=ids, attention_mask=torch.tensor([[1] * 12 + [0] * 4])), "padding"),
    (lambda m, ids: m(input_ids=ids[:, :15], position_ids=torch.arange(15)[None]), "must be even"),
])
def test_bad_model_inputs_raise(call, match):
    model = hra.apply_ring_attention(tiny_model("llama").eval())
    with pytest.raises(ValueError, match=match):
        call(model, token_batch(16, batch=1))


def test_dropout_and_softcap_refused():
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    hra.apply_ring_attention(model).train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        model(input_ids=token_batch(16, batch=1), position_ids=torch.arange(16)[None])
    q = torch.randn(1, 4, 8, 16)
    attn = model.model.layers[0].self_attn
    with pytest.raises(NotImplementedError, match="softcapping"):
        hra.integration.ring_attention_forward(attn, q, q, q, None, softcap=30.0)


def test_shard_batch_pads_and_shifts():
    ids = torch.arange(1, 8)[None]  # N = 7, ring 1 -> padded to 8
    b = hra.shard_batch({"input_ids": ids, "labels": ids})
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert b["labels"].tolist() == [[2, 3, 4, 5, 6, 7, -100, -100]]
    assert b["position_ids"].tolist() == [list(range(7)) + [6]]  # padding repeats the last real position
    assert b["ring_layout"] == "zigzag" and b["ring_documents"] == ((0, 8),)
    assert float(b["num_items_in_batch"]) == 6
    with pytest.raises(ValueError, match="left or inner padding"):
        hra.shard_batch({"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1]])})
