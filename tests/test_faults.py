"""Ranks fail together: deliberate faults on one rank of a ring of 3 (gloo, CPU).

Each case runs on fresh groups from ``setup_groups(3, timeout=5 s)`` and records, per rank, the
error it raised and how long that took. What must hold:
- a disagreement or a local validation error on ONE rank makes EVERY rank raise the same
  ``RingMismatchError``, naming the rank and the field, before any ring communication;
- a rank that fails inside the ring (or never arrives) makes its peers raise ``RingCommError``
  naming the step and the peer, after the group's timeout, never a hang;
- a rank that runs a different layer than its peers makes them raise ``RingOutOfStepError``
  instead of computing on the wrong K/V;
- every case ends within 30 s on every rank.
Before this change every case below hung for torch's 30 min default or was silently wrong
(bf16 vs fp16, different cu_seqlens / window / layout / causal).
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch

import hf_ring_attention as hra
from dist_utils import run_ranks
from models import tiny_model, token_batch

WORLD = 3
TIMEOUT = timedelta(seconds=5)


def _qkv(n=12, hq=4, hkv=2, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, n, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


def _direct(rank, groups, case):
    q, k, v = _qkv()
    kw = {}
    if case == "odd_length" and rank == 1:
        q, k, v = _qkv(n=11)
    if case == "head_counts" and rank == 1:
        q, k, v = _qkv(hq=3)
    if case == "bf16_vs_fp16":
        q, k, v = _qkv(dtype=torch.float16 if rank == 1 else torch.bfloat16)
    if case == "fp32_vs_bf16" and rank == 1:
        q, k, v = _qkv(dtype=torch.bfloat16)
    if case == "cu_seqlens":
        kw["cu_seqlens"] = [0, 10 + rank, 36]
    if case == "float_cu_seqlens":
        kw["cu_seqlens"] = torch.tensor([0.0, 10.5, 36.0])
    if case == "sliding_window" and rank == 1:
        kw["sliding_window"] = 5
    if case == "layout" and rank == 1:
        kw["layout"] = "contiguous"
    if case == "causal" and rank == 1:
        kw["causal"] = False
    hra.ring_attention(q, k, v, group=groups.ring_group, **kw)


class _FailingComm(hra.comm.RingComm):
    """Raises on rank 1 when it starts ring step 1 of layer 1 (the second layer)."""

    def send_recv(self, tensors, *, step=0):
        if self.rank == 1 and step == 1 and self.tag == 3 * 1 + hra.ring.FWD_KV:
            raise RuntimeError("injected fault at ring step 1 of layer 1")
        return super().send_recv(tensors, step=step)


def _model_case(rank, groups, case):
    family = "mistral" if case == "window_config" else "llama"
    model = tiny_model(family, layers=3, sliding_window=12 + (rank == 1) if case == "window_config" else 12).eval()
    options = hra.RingOptions(comm=_FailingComm) if case == "error_in_ring" else None
    if case == "dtype_model" and rank == 1:
        model = model.to(torch.bfloat16)
    if case == "skip_layer" and rank == 1:
        del model.model.layers[1]  # this rank runs layers 0 and 2 while its peers run 0, 1, 2
    hra.apply_ring_attention(model, groups, options=options)
    batch = hra.shard_batch({"input_ids": token_batch(36, batch=1)}, groups)
    if case == "mask_padding" and rank == 1:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][0, -2:] = 0
    if case == "odd_local_length" and rank == 1:
        batch = {k: v[:, :-1] if torch.is_tensor(v) else v for k, v in batch.items()}
        del batch["ring_documents"]
    if case == "absent" and rank == 1:
        raise RuntimeError("this rank failed before the forward and went on")
    with torch.no_grad():
        model(**batch)


def _faults(rank, world, cases):
    results = {}
    for case in cases:
        # Fresh groups: a timed-out group is not reused. The barrier (default group, 60 s) lines the ranks
        # up first, so that creating groups with a short timeout does not itself time out.
        torch.distributed.barrier()
        groups = hra.setup_groups(WORLD, timeout=TIMEOUT)
        start = time.monotonic()
        try:
            (_direct if case in DIRECT else _model_case)(rank, groups, case)
            results[case] = ("no error", "", time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 - the test compares what every rank raised
            results[case] = (type(e).__name__, str(e), time.monotonic() - start)
    return results


DIRECT = ["odd_length", "head_counts", "bf16_vs_fp16", "fp32_vs_bf16", "cu_seqlens", "float_cu_seqlens",
          "sliding_window", "layout", "causal"]
MODEL = ["mask_padding", "odd_local_length", "dtype_model", "window_config"]
STALLS = ["error_in_ring", "skip_layer", "absent"]
EXPECT = {  # case -> text every rank's RingMismatchError contains
    "odd_length": "rank 1 of the ring failed its checks", "head_counts": "rank 1 of the ring failed its checks",
    "bf16_vs_fp16": "disagree on dtype", "fp32_vs_bf16": "disagree on dtype", "cu_seqlens": "disagree on cu_seqlens",
    "float_cu_seqlens": "integer tensor", "sliding_window": "disagree on sliding_window",
    "layout": "disagree on layout", "causal": "disagree on causal",
    "mask_padding": "rank 1 of the ring failed its checks", "odd_local_length": "rank 1 of the ring failed its checks",
    "dtype_model": "disagree on dtype", "window_config": "disagree on model config",
}


@pytest.fixture(scope="module")
def outcomes():
    per_rank = run_ranks(_faults, WORLD, DIRECT + MODEL + STALLS, timeout=400)
    return {case: [r[case] for r in per_rank] for case in DIRECT + MODEL + STALLS}


@pytest.mark.parametrize("case", DIRECT + MODEL)
def test_disagreement_raises_the_same_error_on_every_rank(outcomes, case):
    got = outcomes[case]
    assert all(kind == "RingMismatchError" for kind, _, _ in got), got
    assert len({msg for _, msg, _ in got}) == 1, f"ranks raised different messages: {got}"
    assert EXPECT[case] in got[0][1], got[0][1]
    assert all(sec < 30 for _, _, sec in got), got


def test_a_rank_failing_inside_the_ring_makes_its_peers_fail_in_bounded_time(outcomes):
    got = outcomes["error_in_ring"]
    assert got[1][0] == "RuntimeError" and "injected fault" in got[1][1], got
    kind, msg, sec = got[2]  # rank 2 receives from rank 1 at that step
    assert kind == "RingCommError" and "step 1" in msg and "global rank 1" in msg, got[2]
    # Rank 0's send to rank 1 may complete into gloo's buffer: it then fails at its next exchange,
    # which waits on rank 2.
    assert got[0][0] == "RingCommError", got[0]
    assert all(sec < 30 for _, _, sec in got), got


def test_a_rank_skipping_a_layer_is_out_of_step_not_silently_wrong(outcomes):
    got = outcomes["skip_layer"]
    # Ranks 0 and 2 run layer 1 while rank 1 runs layer 2: the first exchange of that layer carries
    # another pass tag. Each rank raises out-of-step, or times out waiting for a rank that already raised.
    kinds = {kind for kind, _, _ in got}
    assert kinds <= {"RingOutOfStepError", "RingCommError"} and "RingOutOfStepError" in kinds, got
    assert all(sec < 30 for _, _, sec in got), got


def test_a_rank_that_never_arrives_times_out_its_peers(outcomes):
    got = outcomes["absent"]
    assert got[1][0] == "RuntimeError", got
    for rank in (0, 2):
        kind, msg, sec = got[rank]
        assert kind == "RingCommError" and "agreement" in msg, got[rank]
        assert sec < 30, got[rank]


def test_timeout_comes_from_the_environment(monkeypatch):
    from hf_ring_attention.groups import default_timeout

    monkeypatch.setenv("HF_RING_TIMEOUT", "42")
    assert default_timeout() == timedelta(seconds=42)
    monkeypatch.setenv("HF_RING_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HF_RING_TIMEOUT"):
        default_timeout()
    monkeypatch.delenv("HF_RING_TIMEOUT")
    assert default_timeout() == timedelta(minutes=10)
