"""The chunked LM-head loss (hf_ring_attention.loss) equals transformers' ForCausalLMLoss.

Every check compares the patched model (``apply_ring_attention(model, ..., loss_chunk_size=c)``)
with the unpatched single-process model and transformers' own loss on the same data:
- rings 1 (no process group), 2, 3 and dp 2 x ring 2: loss and EVERY parameter gradient, tied
  and untied embeddings, packed documents, chunk sizes 1, 7 (not dividing S_local) and larger
  than S_local, labels with ignored (-100) targets;
- ``num_items_in_batch`` given or not (mean over valid targets), ``shift_labels`` given or not;
- bf16 autocast: within 2x the unchunked bf16 error;
- outputs (logits None with labels), ``loss_chunk_size=None``, bad sizes, tuples, remove, deepcopy;
- families with logit transforms: Gemma 2 softcap, Cohere logit_scale, Granite logits_scaling,
  Mixtral's router aux loss: exact; a vocab slice after the head and a z-loss: refused by name.
Accumulation, DDP and FSDP2 run through ``training_step`` in tests/test_training.py.

Tolerances (relative, norm per loss / per parameter gradient):
- fp32: 1e-5. Both sides are fp32; the chunked sum and the ring's attention change summation
  orders only (measured <= 1e-6). Dropping the divisor, the tie, a chunk, the softcap or the
  ignore mask moves them by >= 1e-3.
- bf16 autocast: chunked error vs the fp32 reference <= 2x the unchunked bf16 error + a budget of
  1e-5 (loss) / 1e-4 (gradients). Both paths compute the same bf16 logits and upcast them; the
  loss then differs by fp32 summation order only (~1e-7), so 1e-5 covers a near-zero unchunked
  error; the gradients' budget covers the different bf16 backward matmuls. Measured (3 seeds):
  loss 0.7-2.3e-5 both ways, gradients 4.5e-3 chunked vs 4.8e-3 unchunked; a softmax left in
  bf16 (no upcast) gives 1.2-4.4e-4 and fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from transformers.loss.loss_utils import ForCausalLMLoss

import hf_ring_attention as hra
from hf_ring_attention.training import shard_window
from dist_utils import run_ranks
from models import tiny_model, token_batch

N = 43  # not a multiple of 2 * ring for rings 2 and 3: shard_batch pads
DOCS = [5, 17, 21]  # packed document lengths of every row (sum N)
CASES = [  # (tied embeddings, packed documents, loss_chunk_size)
    (False, False, 7), (True, True, 7), (True, False, 1000), (False, True, 1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _batch(seed: int, docs: bool, n: int = N) -> dict:
    """Two rows of n tokens; the first 4 labels of row 0 ignored (as a masked prompt)."""
    ids = token_batch(n, seed=seed)
    labels = ids.clone()
    labels[0, :4] = hra.IGNORE_INDEX
    pos = torch.cat([torch.arange(k) for k in DOCS]) if docs else torch.arange(n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos.expand(2, -1).clone()}


def _reference(model, batches: list[dict]):
    """transformers' loss (mean over valid targets) and gradients, every document run alone."""
    logits, targets = [], []
    for b in batches:
        for ids, pos, labels in zip(b["input_ids"], b["position_ids"], b["labels"]):
            starts = [i for i in range(N) if i == 0 or pos[i] != pos[i - 1] + 1] + [N]
            logits.append(torch.cat([model(input_ids=ids[None, a:e], use_cache=False).logits[0]
                                     for a, e in zip(starts, starts[1:])]))
            targets.append(hra.shift_labels(labels[None], pos[None])[0])
    loss = ForCausalLMLoss(torch.stack(logits), None, model.config.vocab_size, shift_labels=torch.stack(targets))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _errors(groups, tie: bool, docs: bool, chunk: int) -> tuple[float, float]:
    """(loss, worst parameter gradient) relative errors of this world against the reference."""
    world = 1 if groups is None else groups.world_size
    rings = 1 if groups is None else groups.dp_size
    model = tiny_model("llama", tie_word_embeddings=tie).train()
    ref = copy.deepcopy(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    hra.apply_ring_attention(model, groups, loss_chunk_size=chunk)
    batches = [_batch(seed=10 + d, docs=docs) for d in range(rings)]  # ring d's batch
    shard = shard_window([batches[0 if groups is None else groups.dp_rank]], groups)[0]
    out = model(**shard)
    assert out.logits is None
    out.loss.backward()
    loss = out.loss.detach().double()
    grads = [p.grad.clone() for p in model.parameters()]
    if world > 1:  # what DDP computes: the mean over all ranks
        for t in [loss, *grads]:
            dist.all_reduce(t)
    ref_loss, ref_grads = _reference(ref, batches)
    return (abs(loss.item() / world - ref_loss.item()) / ref_loss.item(),
            max(_rel(g / world, r) for g, r in zip(grads, ref_grads)))


def _all_cases(rank, world, ring):
    groups = hra.setup_groups(ring)
    return {case: _errors(groups, *case) for case in CASES}


@pytest.mark.parametrize("world, ring", [(1, 1), (2, 2), (3, 3), (4, 2)], ids=["world1", "ring2", "ring3", "dp2xring2"])
def test_chunked_loss_and_every_gradient_match_transformers(world, ring):
    if world == 1:  # an unpatched ring world of 1: no process group at all
        results = [{case: _errors(None, *case) for case in CASES}]
    else:
        results = run_ranks(_all_cases, world, ring, timeout=600)
    for errs in results:
        for (tie, docs, chunk), (loss_err, grad_err) in errs.items():
            assert loss_err < 1e-5 and grad_err < 1e-5, (
                f"tie={tie} docs={docs} chunk={chunk}: loss {loss_err:.3g}, worst gradient {grad_err:.3g}")


def _same_call(kwargs: dict, chunk: int = 5, tie: bool = True):
    """Loss and gradients of the same call on the unpatched and the patched (chunked) model."""
    ref = tiny_model("llama", tie_word_embeddings=tie).train()
    model = hra.apply_ring_attention(copy.deepcopy(ref), loss_chunk_size=chunk)
    outs = []
    for m in (ref, model):
        out = m(**kwargs, use_cache=False)
        out.loss.backward()
        outs.append((out.loss.detach(), [p.grad for p in m.parameters()]))
    (r, rg), (c, cg) = outs
    assert c.dtype == r.dtype, (c.dtype, r.dtype)
    return abs(c.item() - r.item()) / abs(r.item()), max(_rel(a, b) for a, b in zip(cg, rg))


@pytest.mark.parametrize("extra", ["none", "num_items_float", "num_items_tensor64", "shift_labels",
                                   "shift_labels_num_items"])
def test_num_items_in_batch_and_shift_labels_semantics(extra):
    b = _batch(seed=3, docs=False, n=44)  # direct calls: an even length (zigzag halves)
    ids, labels = b["input_ids"], b["labels"]
    shift = torch.roll(labels, -2, dims=1)  # any targets: shift_labels are used as given
    shift[:, -2:] = hra.IGNORE_INDEX
    kwargs = {"none": {}, "num_items_float": {"num_items_in_batch": 17.0},
              "num_items_tensor64": {"num_items_in_batch": torch.tensor(23.0, dtype=torch.float64)},
              "shift_labels": {"shift_labels": shift},
              "shift_labels_num_items": {"shift_labels": shift, "num_items_in_batch": torch.tensor(11)}}[extra]
    loss_err, grad_err = _same_call(dict(input_ids=ids, labels=labels, **kwargs))
    assert loss_err < 1e-5 and grad_err < 1e-5, (extra, loss_err, grad_err)


def test_bf16_autocast_within_twice_unchunked_error():
    b = _batch(seed=4, docs=False, n=44)
    kwargs = dict(input_ids=b["input_ids"], labels=b["labels"], use_cache=False)
    ref = tiny_model("llama", tie_word_embeddings=True).train()
    ref_out = ref(**kwargs)
    ref_out.loss.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in ref.parameters()])
    errs = {}
    for name, chunk in (("unchunked", None), ("chunked", 7)):
        m = hra.apply_ring_attention(tiny_model("llama", tie_word_embeddings=True).train(), loss_chunk_size=chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**kwargs)
        out.loss.backward()
        errs[name] = (abs(out.loss.item() - ref_out.loss.item()) / ref_out.loss.item(),
                      _rel(torch.cat([p.grad.flatten() for p in m.parameters()]), ref_grads))
    for what, e, b, budget in zip(("loss", "grads"), errs["chunked"], errs["unchunked"], (1e-5, 1e-4)):
        assert e <= 2 * b + budget, f"{what}: chunked bf16 {e:.3g} vs unchunked bf16 {b:.3g}"
    assert errs["unchunked"][1] > 1e-4  # autocast really ran in bf16 (the budget is not trivially zero)


def test_outputs_logits_and_switching_off():
    ids = token_batch(16)
    ref = tiny_model("llama").train()
    ref_out = ref(input_ids=ids, labels=ids, use_cache=False)
    model = hra.apply_ring_attention(copy.deepcopy(ref))  # the default: chunked
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss is not None
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=0)
    plain = model(input_ids=ids)  # no labels: logits as usual, no loss
    assert plain.loss is None
    torch.testing.assert_close(plain.logits, ref_out.logits, rtol=1e-5, atol=1e-6)
    loss, *rest = model(input_ids=ids, labels=ids, return_dict=False)  # tuples skip the None logits
    torch.testing.assert_close(loss, ref_out.loss, rtol=1e-5, atol=0)
    twin = copy.deepcopy(model)  # its forward is rebound to the copy (its own weights)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert abs(twin(input_ids=ids, labels=ids).loss.item() - out.loss.item()) > 1e-3
    hra.apply_ring_attention(model, loss_chunk_size=None)  # transformers' own loss, and logits
    off = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(off.loss, ref_out.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(off.logits, ref_out.logits, rtol=1e-5, atol=1e-6)
    hra.apply_ring_attention(model, loss_chunk_size=3)
    assert model(input_ids=ids, labels=ids).logits is None
    hra.remove_ring_attention(model)
    assert "forward" not in model.__dict__ and model(input_ids=ids, labels=ids).logits is not None


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "4096"])
def test_bad_chunk_size_raises(size):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="loss_chunk_size"):
        hra.apply_ring_attention(model, loss_chunk_size=size)
    assert model.config._attn_implementation == "sdpa"  # nothing changed
    with pytest.raises(ValueError, match="chunk_size"):
        hra.chunked_causal_lm_loss(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),
                                   chunk_size=size)


def test_bad_impl_and_second_backward_raise():
    with pytest.raises(ValueError, match="loss_impl"):
        hra.apply_ring_attention(tiny_model("llama"), loss_impl="fused")
    ids = token_batch(16)
    if not torch.cuda.is_available():
        model = hra.apply_ring_attention(tiny_model("llama"), loss_impl="liger")
        with pytest.raises(ValueError, match="liger-kernel"):
            model(input_ids=ids, labels=ids)
    model = hra.apply_ring_attention(tiny_model("llama").train())
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def _family(name: str):
    """A tiny model of a family that transforms its logits (or adds to its loss) after the head."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0,
                  attn_implementation="sdpa")
    torch.manual_seed(0)
    if name == "gemma2_softcap":  # cap small enough to bend these logits (real: 30)
        common["attn_implementation"] = "eager"  # Gemma 2 has no SDPA path
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0,
                                                    attn_logit_softcapping=None, sliding_window=8))
    if name == "cohere_logit_scale":
        return tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.25))
    if name == "granite_logits_scaling":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=3.0, embedding_multiplier=2.0))
    if name == "mixtral_aux_loss":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                                      output_router_logits=True, router_aux_loss_coef=0.5))
    raise ValueError(name)


@pytest.mark.parametrize("name", ["gemma2_softcap", "cohere_logit_scale", "granite_logits_scaling",
                                  "mixtral_aux_loss"])
def test_families_with_logit_transforms_exact(name):
    ref = _family(name).train()
    model = hra.apply_ring_attention(copy.deepcopy(ref), loss_chunk_size=5)
    b = _batch(seed=5, docs=False, n=44)
    outs = []
    for m in (ref, model):
        out = m(input_ids=b["input_ids"], labels=b["labels"], use_cache=False)
        out.loss.backward()
        outs.append((out.loss.detach(), [p.grad for p in m.parameters()]))
    (r, rg), (c, cg) = outs
    assert abs(c.item() - r.item()) / r.item() < 1e-5, (name, c.item(), r.item())
    assert max(_rel(a, e) for a, e in zip(cg, rg) if e.norm() > 0) < 1e-5, name


def test_unreproducible_families_refused_by_name():
    from transformers import LlamaForCausalLM

    class SlicedVocabForCausalLM(LlamaForCausalLM):  # drops logits after the head (as padded-vocab families)
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits[..., :-8]
            return out

    model = SlicedVocabForCausalLM(tiny_model("llama").config)
    hra.apply_ring_attention(model)
    ids = token_batch(16)
    with pytest.raises(NotImplementedError, match="SlicedVocabForCausalLM.*loss_chunk_size=None"):
        model(input_ids=ids, labels=ids)
    hra.apply_ring_attention(model, loss_chunk_size=None)
    assert model(input_ids=ids, labels=ids).loss is not None  # switched off: the family's own path runs
    z_model = tiny_model("llama")
    z_model.config.z_loss_coefficient = 1e-4  # Bamba-style z-loss from the full logits
    with pytest.raises(NotImplementedError, match="z_loss_coefficient.*loss_chunk_size=None"):
        hra.apply_ring_attention(z_model)
    assert z_model.config._attn_implementation == "sdpa"
