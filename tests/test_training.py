"""The training path (make_accelerator + make_dataloader + training_step under DDP) makes the
same update as one process running the unpatched model on the same global batch.

Worlds: ring 2 (2 processes) and dp 2 x ring 2 (4 processes). Per world, one spawn runs every
case for two optimizer steps (a linear-warmup scheduler changes the lr between them, so a
scheduler stepped more than once per step is caught):
- SGD, no accumulation, rows of 30 tokens (not a multiple of 2 * ring: shard_batch pads),
  transformers' own loss (loss_chunk_size=None: full logits);
- SGD, accumulation 2, packed documents (position ids restart), Mistral with sliding window 12,
  tied embeddings, the chunked loss in chunks of 7 rows (not dividing S_local);
- AdamW (weight decay, betas), accumulation 2, packed documents, 30 tokens, the default chunked
  loss (one chunk: 4096 > S_local);
- bf16 mixed precision (accelerate's autocast around the patched forward), SGD, accumulation 2,
  chunks of 5 rows;
- FSDP2 (torch's fully_shard per decoder layer + root, over all W ranks) instead of DDP, SGD,
  accumulation 2, packed documents, tied embeddings, chunks of 7 rows (the LM head's weight is
  the root's, unsharded while the loss runs). accelerate 1.15 enables FSDP only on GPU processes (on CPU
  it silently uses DDP), so this case shards the model with torch directly and drives it with
  the same make_accelerator + training_step; FSDP's reduce-scatter averages over W ranks like
  DDP's all-reduce, which is what the loss scaling assumes.
Reference: the unpatched fp32 model, one process, every document of the global batch run
alone, loss = sum of token losses / number of targets, the same optimizer and scheduler.

Tolerances (relative, norm over all parameters of the update "after - before"):
- fp32 SGD: 2e-5 (and the logged loss 2e-5). Both sides are fp32 with different summation
  orders (measured ~1e-6); a wrong divisor, a double accumulation division, a missing ring's
  data or a second scheduler step changes the update by >= 25%.
- fp32 AdamW: 1e-4. Adam's first steps divide g by sqrt(v) + eps, which amplifies the relative
  error of the tiny gradients (measured ~1e-5); a wrong scale changes m/sqrt(v) only through
  eps, so the lr schedule and the data are what this case checks, plus weight decay.
- bf16: within 2x the unpatched bf16 model's own error + 1e-3 (the rounding noise budget).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import hf_ring_attention as hra
from hf_ring_attention.training import (batch_stream, make_accelerator, make_dataloader, pack_documents,
                                        reduce_loss_for_logging, shard_window, training_step)
from dist_utils import run_ranks
from models import tiny_model

EOS = 1
ROWS_PER_BATCH = 2
CASES = {  # name: (family, optimizer, accumulation, precision, documents, seq_len, wrapper, loss_chunk_size, tied)
    "sgd": ("llama", "sgd", 1, "no", False, 30, "ddp", None, False),
    "sgd_accum2_docs": ("mistral", "sgd", 2, "no", True, 32, "ddp", 7, True),
    "adamw_accum2_docs": ("llama", "adamw", 2, "no", True, 30, "ddp", 4096, False),
    "bf16_sgd_accum2": ("llama", "sgd", 2, "bf16", False, 32, "ddp", 5, False),
    "fsdp2_sgd_accum2_docs": ("llama", "sgd", 2, "no", True, 30, "fsdp2", 7, True),
}


def _rows(seq_len: int, documents: bool, n_rows: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 96, (int(torch.randint(3, 2 * seq_len, (1,), generator=g)),), generator=g).tolist()
            for _ in range(3 * n_rows)]
    packed = pack_documents(docs, seq_len, eos_id=EOS, document_boundaries=documents, drop_remainder=True)
    return [{k: torch.tensor(v[i]) for k, v in packed.items()} for i in range(n_rows)]


def _optimizer(model, name):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.95))


def _scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 4)


def _reference_loss(model, window, autocast: bool):
    """Mean token loss over every document of every row, each document run alone."""
    total, count = 0.0, 0
    for batch in window:
        for ids, pos, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
            starts = [i for i in range(len(pos)) if i == 0 or pos[i] != pos[i - 1] + 1] + [len(pos)]
            for a, b in zip(starts[:-1], starts[1:]):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = model(input_ids=ids[None, a:b], use_cache=False).logits.float()
                target = labels[a + 1:b]
                total = total + torch.nn.functional.cross_entropy(logits[0, :-1], target, reduction="sum")
                count += int((target != hra.IGNORE_INDEX).sum())
    return total / count


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return ((a - b).norm() / b.norm()).item()


def _run_case(world, ring, case, groups):
    from accelerate.state import AcceleratorState, GradientState

    family, opt_name, accum, precision, documents, seq_len, wrapper, chunk, tied = case
    AcceleratorState._reset_state()  # a new mixed precision / accumulation in the same process
    GradientState._reset_state()
    accelerator = make_accelerator(gradient_accumulation_steps=accum, mixed_precision=precision)
    model = tiny_model(family, tie_word_embeddings=tied).train()
    init = [p.detach().clone() for p in model.parameters()]
    refs = {name: copy.deepcopy(model) for name in (("fp32", "bf16") if precision == "bf16" else ("fp32",))}
    ref_opts = {n: _optimizer(m, opt_name) for n, m in refs.items()}
    ref_scheds = {n: _scheduler(o) for n, o in ref_opts.items()}

    hra.apply_ring_attention(model, groups, loss_chunk_size=chunk)
    if wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = _optimizer(model, opt_name)
        scheduler = _scheduler(optimizer)
    else:
        optimizer = _optimizer(model, opt_name)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, _scheduler(optimizer))
    loader = make_dataloader(_rows(seq_len, documents), groups, batch_size=ROWS_PER_BATCH, seed=3,
                             device=accelerator.device)
    stream = batch_stream(loader)
    losses, ref_losses = [], {n: [] for n in refs}
    for _ in range(2):
        window = [next(stream) for _ in range(accum)]
        losses.append(training_step(accelerator, model, optimizer, scheduler, window, groups)["loss"])
        every = [None] * world
        dist.all_gather_object(every, window)
        for r in range(world):  # the same batches within a ring, different ones across rings
            same = every[r - r % ring]
            assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(every[r], same))
        rings = [every[d * ring] for d in range(world // ring)]
        if len(rings) > 1:
            assert not torch.equal(rings[0][0]["input_ids"], rings[1][0]["input_ids"])
        global_window = [{k: torch.cat([r[m][k] for r in rings]) for k in window[m]} for m in range(accum)]
        for name, ref in refs.items():
            loss = _reference_loss(ref, global_window, autocast=name == "bf16")
            loss.backward()
            ref_opts[name].step()
            ref_scheds[name].step()
            ref_opts[name].zero_grad()
            ref_losses[name].append(loss.item())
    after = [(p.full_tensor() if wrapper == "fsdp2" else p).detach().float()
             for p in accelerator.unwrap_model(model).parameters()]
    upd = [a - i for a, i in zip(after, init)]
    errs = {n: (max(abs(x - y) / y for x, y in zip(losses if n == "fp32" else ref_losses[n], ref_losses["fp32"])),
                _rel(upd if n == "fp32" else [p.detach() - i for p, i in zip(refs[n].parameters(), init)],
                     [p.detach() - i for p, i in zip(refs["fp32"].parameters(), init)]))
            for n in refs}
    if precision == "bf16":  # the ring's own error against fp32, and the unpatched bf16 budget
        errs = {"ring": (max(abs(x - y) / y for x, y in zip(losses, ref_losses["fp32"])),
                         _rel(upd, [p.detach() - i for p, i in zip(refs["fp32"].parameters(), init)])),
                "budget": errs["bf16"]}
    return errs


def _exactness(rank, world, ring):
    groups = hra.setup_groups(ring)
    results = {name: _run_case(world, ring, case, groups) for name, case in CASES.items()}
    # The logged loss of an all-ignored window is 0, not NaN (divisor clamped to 1).
    shard = shard_window([{"input_ids": torch.ones(1, 8, dtype=torch.long),
                           "labels": torch.full((1, 8), hra.IGNORE_INDEX)}], groups)[0]
    assert float(shard["num_items_in_batch"]) == 1.0 / groups.world_size
    assert reduce_loss_for_logging(torch.tensor(float(rank)), groups) == sum(range(world)) / world
    return results


@pytest.mark.parametrize("world, ring", [(2, 2), (4, 2)])
def test_training_step_equals_single_process_update(world, ring):
    for rank_results in run_ranks(_exactness, world, ring, timeout=400):
        for name, errs in rank_results.items():
            if "budget" in errs:
                for what, e, b in zip(("loss", "update"), errs["ring"], errs["budget"]):
                    assert e <= 2 * b + 1e-3, f"{name} {what}: ring bf16 {e:.3g} vs unpatched bf16 {b:.3g}"
                continue
            loss_err, update_err = errs["fp32"]
            tol = 1e-4 if "adamw" in name else 2e-5
            assert loss_err < 2e-5, f"{name}: logged loss relative error {loss_err:.3g}"
            assert update_err < tol, f"{name}: parameter update relative error {update_err:.3g} (tol {tol})"


def test_pack_documents():
    docs = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    out = pack_documents(docs, 4, eos_id=2)
    assert out["input_ids"] == [[5, 6, 7, 2], [8, 9, 10, 11], [12, 13, 14, 2], [15, 2, 0, 0]]
    # A document cut by a row end restarts at 0; padding is a separate, ignored "document".
    assert out["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert out["labels"][-1] == [15, 2, -100, -100]
    plain = pack_documents(docs, 5, document_boundaries=False, drop_remainder=True)
    assert plain["input_ids"] == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert plain["position_ids"] == [list(range(5))] * 2
    mid = pack_documents([[1, 2], [3, 4, 5]], 5, eos_id=None)["position_ids"]
    assert mid == [[0, 1, 0, 1, 2]]
    # Targets: none across a document boundary, none for padding.
    b = hra.shard_batch({k: torch.tensor(v) for k, v in out.items()})
    assert b["labels"][0].tolist() == [6, 7, 2, -100]
    assert b["labels"][3].tolist() == [2, -100, -100, -100]
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents(docs, 1)
