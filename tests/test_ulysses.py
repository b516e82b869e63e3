"""Ulysses (all-to-all) x ring sequence parallelism against the unsharded single process (CPU, gloo).

One spawn per world size runs every case: world 2 as U x C = 2 x 1 and 1 x 2, world 4 as 2 x 2
and 4 x 1, plus dp 2 x U 2 x C 1 training steps (4 processes) and the fault cases.
- raw ``ulysses_attention`` (out, dq, dk, dv) against tests/reference.py in fp64: GQA with
  Hkv < U (kv heads replicated), MHA, an awkward GQA (12 / 6 heads: one kv copy per query head
  at U = 4), a sliding window, packed documents (global and per-document zigzag), non-causal;
- the patched tiny Llama (4 / 2 heads) and Mistral (sliding window 12) against the unpatched
  model on the full sequence: loss, logits (through ``gather_sequence``) and every parameter
  gradient, with and without gradient checkpointing, a length that is not a multiple of 2UC,
  packed documents;
- training: ``test_training._run_case`` (DDP over all W ranks) at dp 2 x U 2 x C 1.

Tolerances, as in test_ring_core / test_integration:
- raw attention, fp32 against an fp64 reference: 2e-5 absolute on O(1) values (fp32 roundoff
  over <= 96 keys and <= 4 merges stays within a few hundred ulps; measured <= 2e-6), while a
  head routed to the wrong rank, a wrong piece order or a missing replica gradient is O(0.1);
- models, fp32 against fp32 with another summation order: 2e-5 relative (measured ~1e-6);
  training updates 2e-5 relative (SGD).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hf_ring_attention as hra
from hf_ring_attention.sharding import sp_shard_index
from hf_ring_attention.ulysses import head_split
from dist_utils import run_ranks
from models import tiny_model, token_batch
from reference import reference_attention

ATTN_CASES = [
    # (batch, q heads, kv heads, head dim, layout, causal, window, docs)
    (1, 8, 2, 16, "zigzag", True, None, None),
    (2, 4, 1, 16, "zigzag", True, None, None),  # Hkv = 1 < U: replicated kv head
    (1, 4, 4, 16, "zigzag", True, 7, None),
    (1, 12, 6, 8, "zigzag", True, None, None),  # U = 4: 3 query heads per rank, one kv copy each
    (1, 8, 2, 16, "zigzag", True, 9, "docs"),
    (2, 4, 2, 16, "zigzag_docs", True, None, "docs"),
    (1, 8, 4, 16, "zigzag_docs", True, 5, "docs"),
    (1, 4, 2, 8, "contiguous", False, None, None),
]
MODEL_CASES = [  # (family, packed documents, gradient checkpointing)
    ("llama", False, False), ("llama", False, True), ("mistral", False, False), ("llama", True, False),
    ("mistral", True, True),
]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _attention_errors(groups, case, chunk=6):
    b, hq, hkv, d, layout, causal, window, docs = case
    u, c = groups.ulysses_size, groups.ring_size
    n = 2 * u * c * chunk
    cu = None
    if docs == "docs":  # documents of 5 and 2 tokens (global zigzag), or multiples of 2C (per-document zigzag)
        cu = [0, 2 * c, n - 4 * c, n] if layout == "zigzag_docs" else [0, 5, n - 7, n - 5, n]
    g = torch.Generator().manual_seed(1234)  # the same full tensors on every rank
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*full, causal=causal, window=window, cu_seqlens=cu)
    ref.backward(dout)
    idx = sp_shard_index(layout, groups.sp_rank, groups.sp_size, n // (u * c),
                         cu if layout == "zigzag_docs" else None, ulysses_size=u)
    local = [t[:, :, idx].float().requires_grad_() for t in (q, k, v)]
    out = hra.ulysses_attention(*local, groups, causal=causal, layout=layout, sliding_window=window, cu_seqlens=cu)
    assert out.shape == local[0].shape and out.dtype == torch.float32
    out.backward(dout[:, :, idx].float())
    got = [out.detach()] + [t.grad for t in local]
    want = [ref.detach()] + [t.grad for t in full]
    return [(a.double() - w[:, :, idx]).abs().max().item() for a, w in zip(got, want)]


def _model_errors(groups, family, docs, ckpt):
    u, c = groups.ulysses_size, groups.ring_size
    n = 2 * u * c * 8 - 3  # not a multiple of 2UC: shard_batch pads
    ids = token_batch(n, batch=2)
    lengths = [[5, n - 12, 2, 5], [n - 9, 9]] if docs else [[n], [n]]
    pos = torch.stack([torch.cat([torch.arange(k) for k in row]) for row in lengths])
    ref = tiny_model(family).train()
    total, count, ref_logits = 0.0, 0, []
    for r, row in enumerate(lengths):  # every document alone through the unpatched model
        start, pieces = 0, []
        for k in row:
            out = ref(input_ids=ids[r:r + 1, start:start + k], use_cache=False)
            pieces.append(out.logits[0])
            total = total + torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[r, start + 1:start + k],
                                                              reduction="sum")
            count += k - 1
            start += k
        ref_logits.append(torch.cat(pieces))
    ref_loss = total / count
    ref_loss.backward()

    model = hra.apply_ring_attention(tiny_model(family).train(), groups)
    if ckpt:
        model.gradient_checkpointing_enable()
    batch = hra.shard_batch({"input_ids": ids, "labels": ids, "position_ids": pos}, groups)
    out = model(**batch)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=groups.sp_group)  # each rank's loss is scaled by sp_size (see shard_batch)
    logits = hra.gather_sequence(out.logits.detach(), batch, groups, dim=1)  # (B, N_padded, V)
    if batch["ring_layout"] == "zigzag_docs":  # drop the padding at the end of every document
        logits = torch.stack([torch.cat([logits[r, a:a + k] for a, k in zip(cu, row)])
                              for r, (cu, row) in enumerate(zip(batch["ring_documents"], lengths))])
    grads = []
    for p in model.parameters():
        gr = p.grad.clone()
        dist.all_reduce(gr, group=groups.sp_group)
        grads.append(gr / groups.sp_size)
    return (abs(loss.item() / groups.sp_size - ref_loss.item()) / ref_loss.item(),
            _rel(logits[:, :n], torch.stack(ref_logits).detach()),
            _rel(torch.cat([x.flatten() for x in grads]), torch.cat([p.grad.flatten() for p in ref.parameters()])))


def _exactness(world, configs):
    results = {}
    for u, c in configs:
        groups = hra.setup_groups(c, ulysses_size=u)
        for case in ATTN_CASES:
            if case[1] % u == 0:
                results[("attention", u, c, case)] = _attention_errors(groups, case)
        for case in MODEL_CASES:
            results[("model", u, c, case)] = _model_errors(groups, *case)
    return results


def _faults(groups):
    """Each case raises on every rank; returns {case: (exception type, message)} of this rank."""
    rank = groups.sp_rank
    g = torch.Generator().manual_seed(0)
    qkv = lambda hq=4, hkv=2, n=8: [torch.randn(1, h, n, 8, generator=g) for h in (hq, hkv, hkv)]  # noqa: E731
    cases = {
        "odd_heads_one_rank": lambda: hra.ulysses_attention(*qkv(hq=3 if rank == 1 else 4), groups),
        "heads_not_divisible": lambda: hra.ulysses_attention(*qkv(hq=3, hkv=1), groups),
        "window_disagrees": lambda: hra.ulysses_attention(*qkv(), groups, sliding_window=4 + rank),
        "model_heads_not_divisible": lambda: hra.apply_ring_attention(
            tiny_model("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=1).eval(), groups)(
                **hra.shard_batch({"input_ids": token_batch(16, batch=1)}, groups)),
        "model_config_disagrees": lambda: hra.apply_ring_attention(
            tiny_model("llama", num_key_value_heads=4 if rank == 1 else 2).eval(), groups)(
                **hra.shard_batch({"input_ids": token_batch(16, batch=1)}, groups)),
    }
    out = {}
    for name, call in cases.items():
        try:
            with torch.no_grad():
                call()
            out[name] = ("no error", "")
        except Exception as e:  # noqa: BLE001 - the test compares what every rank raised
            out[name] = (type(e).__name__, str(e))
    return out


def _world2(rank, world):
    results = _exactness(world, [(2, 1), (1, 2)])
    return results, _faults(hra.setup_groups(1, ulysses_size=2))


def _world4(rank, world):
    from test_training import CASES, _run_case

    results = _exactness(world, [(2, 2), (4, 1)])
    groups = hra.setup_groups(2, ulysses_size=2)  # sp [0-3], Ulysses [0,1] [2,3], rings [0,2] [1,3]
    layout = {name: dist.get_process_group_ranks(getattr(groups, name))
              for name in ("ulysses_group", "ring_group", "sp_group")}
    layout["ranks"] = (groups.sp_rank, groups.ring_rank, groups.ulysses_rank)
    dp = hra.setup_groups(1, ulysses_size=2)  # dp 2 x U 2 x C 1
    layout["dp"] = (dp.dp_rank, dist.get_process_group_ranks(dp.dp_group), dp.world_size)
    training = {name: _run_case(world, dp.sp_size, CASES[name], dp) for name in ("sgd", "sgd_accum2_docs")}
    return results, layout, training


@pytest.fixture(scope="module")
def world2():
    return run_ranks(_world2, 2, timeout=600)


@pytest.fixture(scope="module")
def world4():
    return run_ranks(_world4, 4, timeout=900)


def _check_exact(per_rank):
    for results in per_rank:
        for (kind, u, c, case), errs in results.items():
            assert max(errs) < 2e-5, f"{kind} U={u} C={c} {case}: errors {errs}"


def test_exact_at_u2_c1_and_u1_c2(world2):
    _check_exact([r[0] for r in world2])
    assert {(k[1], k[2]) for k in world2[0][0]} == {(2, 1), (1, 2)}


def test_exact_at_u2_c2_and_u4_c1(world4):
    _check_exact([r[0] for r in world4])
    assert {(k[1], k[2]) for k in world4[0][0]} == {(2, 2), (4, 1)}


def test_rank_layout(world4):
    for rank, (_, layout, _) in enumerate(world4):
        assert layout["ulysses_group"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert layout["ring_group"] == [rank % 2, rank % 2 + 2]
        assert layout["sp_group"] == [0, 1, 2, 3]
        assert layout["ranks"] == (rank, rank // 2, rank % 2)
        assert layout["dp"] == (rank // 2, [rank % 2, rank % 2 + 2], 4)


def test_dp2_u2_c1_training_step_equals_single_process(world4):
    for _, _, training in world4:
        for name, errs in training.items():
            loss_err, update_err = errs["fp32"]
            assert loss_err < 2e-5 and update_err < 2e-5, f"{name}: loss {loss_err:.3g}, update {update_err:.3g}"


@pytest.mark.parametrize("case, match", [
    ("odd_heads_one_rank", "rank 1 of the ring failed its checks"),
    ("heads_not_divisible", "ulysses_size=2 does not divide the 3 attention heads"),
    ("window_disagrees", "disagree on sliding_window"),
    ("model_heads_not_divisible", "ulysses_size=2 does not divide the 3 attention heads"),
    ("model_config_disagrees", "disagree on model config"),
])
def test_faults_raise_the_same_error_on_every_rank(world2, case, match):
    got = [faults[case] for _, faults in world2]
    assert all(kind == "RingMismatchError" for kind, _ in got), got
    assert len({msg for _, msg in got}) == 1, f"ranks raised different messages: {got}"
    assert match in got[0][1], got[0][1]


def test_head_split():
    assert head_split(8, 2, 2).kv_heads == ((0,), (1,))  # no replication
    assert head_split(8, 2, 4).kv_heads == ((0,), (0,), (1,), (1,))  # Hkv < U: each kv head twice
    assert head_split(4, 4, 2).kv_heads == ((0, 1), (2, 3))
    s = head_split(12, 6, 4)  # 3 query heads per rank straddle kv groups of 2: one kv copy per query head
    assert s.kv_heads == ((0, 0, 1), (1, 2, 2), (3, 3, 4), (4, 5, 5)) and s.replication == 2.0
    assert head_split(12, 6, 2).kv_heads == ((0, 1, 2), (3, 4, 5))
    with pytest.raises(ValueError, match=r"Choose ulysses_size in \[1, 2, 4, 8\]"):
        head_split(8, 2, 3)


@pytest.mark.parametrize("u, c", [(2, 1), (1, 2), (2, 2), (4, 1), (2, 3)])
def test_shard_batch_layout_and_index(u, c):
    """shard_batch's shards are x_full[sp_shard_index(...)] and partition the padded row (no communication)."""
    n = 2 * u * c * 4 - 5
    ids = torch.arange(1, n + 1)[None]
    for docs in (False, True):
        pos = torch.cat([torch.arange(k) for k in (7, n - 7)])[None] if docs else None
        batch = {"input_ids": ids, "labels": ids} | ({"position_ids": pos} if docs else {})
        shards, seen = [], []
        for sp_rank in range(u * c):
            groups = hra.RingGroups(None, sp_rank // u, c, None, 0, 1, ulysses_rank=sp_rank % u, ulysses_size=u)
            shard = hra.shard_batch(batch, groups)
            total = shard["ring_documents"][0][-1]
            assert total % (2 * u * c) == 0 and total - n < 2 * u * c + (2 * c if docs else 0)
            cu = shard["ring_documents"][0] if shard["ring_layout"] == "zigzag_docs" else None
            idx = sp_shard_index(shard["ring_layout"], sp_rank, u * c, shard["input_ids"].shape[1], cu, ulysses_size=u)
            padded = torch.zeros(total, dtype=torch.long)
            padded[idx] = shard["input_ids"][0]
            shards.append(padded)
            seen.append(idx)
            assert float(shard["num_items_in_batch"]) == (n - 1 - docs) / (u * c)
        assert sorted(torch.cat(seen).tolist()) == list(range(total))  # a partition of the padded row
        row = torch.stack(shards).sum(0)
        assert row[row > 0].tolist() == ids[0].tolist()  # the tokens in order, padding aside
