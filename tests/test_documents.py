"""Packed documents over the ring equal each document run separately and unsharded.

Two rows of documents of random lengths (some shorter than a zigzag chunk, one spanning
several ranks), packed with position_ids that restart at 0 per document, through the
patched tiny Llama (GQA) and Mistral (GQA + sliding window 12) at ring sizes 2 and 4.
Reference: the unpatched fp32 model on every document alone. Tolerance 2e-5 relative, as in
test_integration (fp32 against fp32 with another summation order; measured ~1e-6), while a
single attention across a document boundary changes the logits by O(1e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hf_ring_attention as hra
from dist_utils import run_ranks
from models import tiny_model, token_batch


def _doc_lengths(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], n
    while left > 0:
        cut = min(left, int(torch.randint(2, max(3, n // 2), (1,), generator=g)))
        lengths.append(cut)
        left -= cut
    return lengths


def _packed(rank, world, family):
    groups = hra.setup_groups(world)
    n = 2 * world * 8
    # Row 0: short documents (< one 8-token chunk) around one spanning several ranks; row 1: random.
    rows = [[5, n - 12, 2, 5], _doc_lengths(n, seed=3)]
    ids = token_batch(n, batch=2)
    pos = torch.stack([torch.cat([torch.arange(k) for k in lens]) for lens in rows])

    ref = tiny_model(family).train()
    total, count, logits = 0.0, 0, []
    for r, lens in enumerate(rows):
        row_logits, start = [], 0
        for k in lens:
            doc = ids[r:r + 1, start:start + k]
            out = ref(input_ids=doc, use_cache=False)
            row_logits.append(out.logits[0])
            if k > 1:
                total = total + torch.nn.functional.cross_entropy(out.logits[0, :-1], doc[0, 1:], reduction="sum")
                count += k - 1
            start += k
        logits.append(torch.cat(row_logits))
    ref_loss = total / count
    ref_loss.backward()

    model = hra.apply_ring_attention(tiny_model(family).train(), groups, loss_chunk_size=None)  # logits compared
    batch = hra.shard_batch({"input_ids": ids, "labels": ids, "position_ids": pos}, groups)
    out = model(**batch)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=groups.ring_group)
    # shard_batch padded every document to a multiple of 2C and sharded each on its own:
    # gather each row back and drop the padding at the end of each document.
    rows_back = []
    for r, (lens, cu) in enumerate(zip(rows, batch["ring_documents"])):
        row = hra.zigzag_unshard(out.logits[r:r + 1].detach(), dim=1, group=groups.ring_group, cu_seqlens=cu)
        rows_back.append(torch.cat([row[0, a:a + k] for a, k in zip(cu, lens)]))
    full_logits = torch.stack(rows_back)
    gerr = 0.0
    for p, pr in zip(model.parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=groups.ring_group)
        gerr = max(gerr, ((g / world - pr.grad).norm() / pr.grad.norm()).item())
    lerr = ((full_logits - torch.stack(logits).detach()).norm() / torch.stack(logits).norm()).item()
    work = _planned_work(batch["ring_documents"][0], world)
    return rows, abs(loss.item() / world - ref_loss.item()) / ref_loss.item(), lerr, gerr, work


def _planned_work(cu, world):
    """Query-key pairs each rank computes for one row (from the plan)."""
    from hf_ring_attention.plan import MaskSpec, step_tasks

    spec, s = MaskSpec(cu_seqlens=tuple(cu)), cu[-1] // world
    return [sum((t.q.stop - t.q.start) * (t.k.stop - t.k.start) for st in range(world)
                for t in step_tasks(spec, "zigzag_docs", r, (r - st) % world, world, s)) for r in range(world)]


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("world", [2, 4])
def test_packed_documents_equal_separate_documents(family, world):
    rows, loss_err, logit_err, grad_err, work = run_ranks(_packed, world, family)[0]
    assert max(loss_err, logit_err, grad_err) < 2e-5, (rows, loss_err, logit_err, grad_err)
    # Per-document zigzag: every rank plans the same work for every document.
    assert max(work) == min(work), work


def test_shift_labels_ignore_document_starts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert hra.shift_labels(ids, pos).tolist() == [[6, 7, -100, 9, -100, -100]]


def test_documents_are_not_attended_across():
    """Core op: changing another document's keys leaves this document's output unchanged."""
    q = torch.randn(1, 2, 16, 8)
    k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    cu = [0, 6, 16]
    out = hra.ring_attention(q, k, v, cu_seqlens=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :6] += 5.0
    v2[:, :, :6] -= 3.0
    out2 = hra.ring_attention(q, k2, v2, cu_seqlens=cu)
    torch.testing.assert_close(out[:, :, 6:], out2[:, :, 6:], rtol=0, atol=0)
    assert not torch.isnan(out).any()
