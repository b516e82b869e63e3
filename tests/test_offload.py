"""Activation offload (transformers' ``activation_checkpointing_enable(offload=True)``) with the ring.

Under offload, each checkpointed layer's inputs are copied to host memory in the forward
(``torch.autograd.graph.save_on_cpu``) and back for the recompute, which runs the layer's ring
pass again. On this CPU-only machine transformers' path asks for pinned memory, which a torch
without an accelerator cannot give (``torch.cpu.is_available()`` is True, so ``save_on_cpu``
requests pinning and ``torch.empty(pin_memory=True)`` raises). The ranks here report
``torch.cpu.is_available() = False`` and an accelerator to ``enable_checkpointing``: then
``save_on_cpu`` copies every saved layer input into a fresh, unpinned host tensor and back,
the GPU path except for pinning. The test counts those copies, so it fails if offload is off.

Tolerances: fp32, 2e-5 relative on the loss and every parameter gradient (as in
test_integration: different summation orders measure <= 1e-6; a stale or wrong recomputed
input moves gradients by O(1e-2)). Under bf16 autocast: the ring's error against the fp32
unpatched model within 2x the unpatched autocast model's error + 1e-3.
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


def _flat_grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _offload_case(rank, world, autocast):
    from hf_ring_attention import training

    torch.cpu.is_available = lambda: False  # see the module docstring: unpinned host copies
    training._has_accelerator = lambda: True
    packs = [0]
    empty = torch.empty

    def counting_empty(*args, **kwargs):
        packs[0] += "pin_memory" in kwargs  # save_on_cpu's pack: one per saved layer input
        return empty(*args, **kwargs)

    groups = hra.setup_groups(world)
    ids = token_batch(2 * world * 8 - 3)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad

    ref = tiny_model("llama").train()  # fp32, no checkpointing, no autocast: the reference
    ref_out = ref(input_ids=ids, labels=ids, use_cache=False)
    ref_out.loss.backward()
    ref_grads = _flat_grads(ref)

    model = tiny_model("llama").train()
    assert training.enable_checkpointing(model, offload=True)
    hra.apply_ring_attention(model, groups)
    torch.empty = counting_empty
    try:
        with ctx():
            out = model(**hra.shard_batch({"input_ids": ids, "labels": ids}, groups))
    finally:
        torch.empty = empty
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    grads = _flat_grads(model)
    dist.all_reduce(grads)
    errs = (abs(loss.item() / world - ref_out.loss.item()) / ref_out.loss.item(), _rel(grads / world, ref_grads))
    base = None
    if autocast:  # the unpatched model's own autocast error: the budget
        plain = tiny_model("llama").train()
        with ctx():
            o = plain(input_ids=ids, labels=ids, use_cache=False)
        o.loss.backward()
        base = (abs(o.loss.item() - ref_out.loss.item()) / ref_out.loss.item(), _rel(_flat_grads(plain), ref_grads))
    return errs, base, packs[0], model.config.num_hidden_layers


def test_offload_ring_matches_unpatched_fp32():
    for errs, _, packs, layers in run_ranks(_offload_case, 2, False, timeout=600):
        assert packs >= layers, f"offload did not run: {packs} host copies for {layers} checkpointed layers"
        assert max(errs) < 2e-5, f"relative errors (loss, grads) = {errs}"


def test_offload_ring_under_bf16_autocast():
    for errs, base, packs, layers in run_ranks(_offload_case, 2, True, timeout=600):
        assert packs >= layers, f"offload did not run: {packs} host copies for {layers} checkpointed layers"
        for name, e, b in zip(("loss", "grads"), errs, base):
            assert e <= 2 * b + 1e-3, f"{name}: ring + offload under autocast {e:.3g} vs unpatched autocast {b:.3g}"


def test_offload_ignored_without_accelerator():
    # Nothing to move off a device: checkpointing only (transformers' offload would fail on pinning).
    model = tiny_model("llama").train()
    assert hra.training.enable_checkpointing(model, offload=True) is False
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ids = token_batch(16, batch=1)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


@pytest.mark.parametrize("offload", [False, True])
def test_enable_checkpointing_refuses_offload_on_old_transformers(monkeypatch, offload):
    model = tiny_model("llama").train()
    monkeypatch.setattr(hra.training, "_has_accelerator", lambda: True)
    monkeypatch.setattr(model, "activation_checkpointing_enable",
                        lambda activation_checkpointing_kwargs=None: None, raising=False)
    if offload:
        with pytest.raises(NotImplementedError, match="offload"):
            hra.training.enable_checkpointing(model, offload=True)
    else:
        assert hra.training.enable_checkpointing(model) is False
