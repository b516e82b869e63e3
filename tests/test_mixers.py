"""Models whose layers mix tokens outside attention are exact on the ring.

Tiny Qwen3-Next and Qwen3.5 (gated delta-net), LFM2 (short convolutions), Bamba and
GraniteMoeHybrid (Mamba2), each with attention layers beside the mixers, patched at ring 2 and
3, against the unpatched single-process model on the full sequence: loss, logits and every
parameter gradient (mean of the ranks' gradients, as DDP computes; see test_integration).
Cases: the default strategy (head-parallel / halo) on a length that is not a multiple of 2C,
the same under gradient checkpointing, the generic "gather" strategy, and packed documents
(two rows packed differently, documents shorter than a zigzag chunk), sharded per document
(zigzag_docs) and with the plain zigzag. Ulysses: 2 processes as setup_groups(1, ulysses_size=2)
(each rank holds a contiguous half, not the zigzag chunks of ring 2), one family per mixer kind,
default and packed cases. The models use transformers' loss and logits
(apply_ring_attention(loss_chunk_size=None)) so that the logits can be compared.

Packed rows: these mixers do not reset their state at document starts (transformers' torch
paths ignore position_ids there), so the reference is the unpatched model on the same packed
row. Documents are multiples of 2C long: for other lengths shard_batch(balance_documents=True)
pads each document, and a mixer that does not reset carries those pad tokens into the next
document, which the unpatched model on the user's row never sees (pass balance_documents=False
for such models; then only the end is padded, which no real token sees). A patched mixer refuses
the padded layout by name (every rank: the flag is part of the forward's agreement).

Tolerance 2e-5 relative, as in test_integration: fp32 on both sides with other summation orders
(head subsets, convolutions over runs); we measure <= 1e-6, while a mixer that sees the wrong
tokens moves the logits by 1e-2 (LFM2) to 0.5 (Bamba).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import hf_ring_attention as hra
from dist_utils import run_ranks
from hf_ring_attention import mixers
from models import HYBRIDS, tiny_hybrid, tiny_model, token_batch

TOL = 2e-5
ULYSSES = ("qwen3_next", "lfm2", "bamba")  # one family per mixer kind (delta-net, halo conv, Mamba2)
CASES = ("default", "checkpointing", "gather", "packed_docs", "packed_zigzag")
HEADS_ONLY = ("qwen3_5",)  # same delta-net core as qwen3_next: one case is enough
# GraniteMoeHybrid builds its attention mask without position_ids: unpatched, it attends across
# the documents of a packed row, while the ring keeps to each document (an attention question,
# not a mixer one; its Mamba2 mixer is Bamba's code, which the packed cases cover).
NOT_PACKED = ("granitemoehybrid",)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def _reference(family, ids, pos, targets):
    """Unpatched model on full rows: (loss, logits, grads); targets are shifted (-100 ignored)."""
    model = tiny_hybrid(family).train()
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    loss = loss / (targets != -100).sum()
    loss.backward()
    return loss.detach(), logits.detach(), _grads(model)


def _packed_rows(world):
    """Two rows packed differently; documents of 2C tokens have zigzag chunks of one token."""
    units = [[1, 5, 1, 1], [3, 2, 3]]  # document lengths in units of 2C; 16C tokens per row
    return torch.stack([torch.cat([torch.arange(2 * world * k) for k in lens]) for lens in units])


def _case(family, case, groups):
    world = groups.sp_size  # U * C ranks share each sequence
    packed = case.startswith("packed")
    # Unpacked: a length that is not a multiple of 2C (shard_batch pads the end; compare the real
    # tokens). Packed: document lengths that are multiples of 2C, so the ring holds the user's row
    # itself (see the module docstring on per-document padding).
    n = 16 * world if packed else 16 * world - 3
    ids = token_batch(n, batch=2)
    pos = _packed_rows(world) if packed else torch.arange(n)[None].expand(2, -1)
    batch = hra.shard_batch({"input_ids": ids, "labels": ids, "position_ids": pos}, groups,
                            balance_documents=case != "packed_zigzag")
    # Per-document zigzag needs a ring (C > 1); Ulysses alone keeps the row's order (contiguous pieces).
    assert batch["ring_layout"] == ("zigzag_docs" if case == "packed_docs" and groups.ring_size > 1 else "zigzag")
    model = hra.apply_ring_attention(tiny_hybrid(family).train(), groups, loss_chunk_size=None)
    chosen = mixers.install_mixers(model, groups, strategy="gather" if case == "gather" else "auto")
    if case == "checkpointing":
        model.gradient_checkpointing_enable()
    out = model(**batch)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=groups.sp_group)
    grads = _grads(model)
    dist.all_reduce(grads, group=groups.sp_group)
    logits = hra.gather_sequence(out.logits.detach(), batch, groups)[:, :n]  # any layout, any U x C
    ref_loss, ref_logits, ref_grads = _reference(family, ids, pos, hra.shift_labels(ids, pos))
    errs = (abs(loss.item() / world - ref_loss.item()) / ref_loss.item(), _rel(logits, ref_logits),
            _rel(grads / world, ref_grads))
    return errs, sorted(set(chosen.values()))


def _refusals(groups):
    """Refusals raised on every rank together (world 3), with the feature named."""
    out = {}
    model = hra.apply_ring_attention(tiny_hybrid("qwen3_next"), groups)
    batch = hra.shard_batch({"input_ids": token_batch(12, batch=1)}, groups)
    try:
        model(**batch, seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    except NotImplementedError as e:
        out["seq_idx"] = str(e)
    # Packed documents of 5 and 7 tokens at ring 3: shard_batch pads the first to 6, between the two.
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    batch = hra.shard_batch({"input_ids": token_batch(12, batch=1), "position_ids": pos}, groups)
    assert batch["ring_padding_between_documents"] == (True,)
    try:
        model(**batch)
    except NotImplementedError as e:
        out["padding"] = str(e)
    few = tiny_hybrid("granitemoehybrid", mamba_n_heads=2, mamba_d_head=48)  # 2 heads < 3 ranks
    hra.apply_ring_attention(few, groups)
    out["auto"] = sorted(set(mixers.install_mixers(few, groups).values()))
    try:
        mixers.install_mixers(few, groups, strategy="heads")
    except ValueError as e:
        out["heads"] = str(e)
    return out


def _all_cases(rank, world, families):
    groups = hra.setup_groups(world)
    results = {(f, c): _case(f, c, groups) for f in families
               for c in (CASES[:1] if f in HEADS_ONLY else CASES[:3] if f in NOT_PACKED else CASES)}
    return results, (_refusals(groups) if world == 3 else None)


def _ulysses_cases(rank, world, families):
    groups = hra.setup_groups(1, ulysses_size=world)
    assert (groups.sp_size, groups.ulysses_size, groups.ring_size) == (world, world, 1)
    return {(f, c): _case(f, c, groups) for f in families for c in ("default", "packed_docs")}


@pytest.mark.parametrize("world", [2, 3])
def test_hybrid_models_match_unpatched(world):
    results, refusals = run_ranks(_all_cases, world, HYBRIDS, timeout=600)[0]
    for (family, case), (errs, strategies) in results.items():
        assert max(errs) < TOL, f"{family} {case} ring {world}: relative errors (loss, logits, grads) = {errs}"
        assert strategies == (["gather"] if case == "gather" else ["heads"]), (family, case, strategies)
    if refusals is not None:
        assert "gated delta-net" in refusals["seq_idx"] and "position_ids" in refusals["seq_idx"], refusals
        assert "balance_documents=False" in refusals.get("padding", ""), refusals  # not silently wrong
        assert refusals["auto"] == ["gather"], refusals  # fewer heads than ranks: the generic strategy
        assert "2 heads to split over 3 ranks" in refusals["heads"] and "gather" in refusals["heads"], refusals


def test_hybrid_models_match_unpatched_ulysses():
    """U = 2, C = 1: the mixers find each rank's tokens with sp_shard_index(ulysses_size=U)."""
    results = run_ranks(_ulysses_cases, 2, ULYSSES, timeout=600)[0]
    for (family, case), (errs, strategies) in results.items():
        assert max(errs) < TOL, f"{family} {case} Ulysses 2: relative errors (loss, logits, grads) = {errs}"
        assert strategies == ["heads"], (family, case, strategies)


@pytest.mark.parametrize("family", HYBRIDS)
def test_single_process_patch_is_the_model_and_remove_restores(family):
    model = tiny_hybrid(family).eval()
    ids = token_batch(12, batch=1)
    before = model(input_ids=ids, use_cache=False).logits
    forwards = {name: m.forward for name, m in model.named_modules() if type(m).__name__ in mixers.MIXERS}
    hra.apply_ring_attention(model)
    assert set(mixers.exact_mixers(model)) == set(forwards) and forwards
    assert all(model.get_submodule(name).forward != f for name, f in forwards.items())
    torch.testing.assert_close(model(input_ids=ids, position_ids=torch.arange(12)[None]).logits, before,
                               atol=1e-5, rtol=1e-5)
    hra.remove_ring_attention(model)
    assert all(model.get_submodule(name).forward == f for name, f in forwards.items())
    assert all("forward" not in model.get_submodule(name).__dict__ for name in forwards)


@pytest.mark.parametrize("family, types", [("qwen3_next", {"linear_attention"}), ("lfm2", {"conv"}),
                                           ("bamba", {"linear_attention"}), ("granitemoehybrid", {"linear_attention"})])
def test_exact_layer_types(family, types):
    assert mixers.exact_layer_types(tiny_hybrid(family)) == types
    assert mixers.exact_layer_types(tiny_model("llama")) == set()
