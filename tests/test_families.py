"""Every installed transformers causal-LM family: the ring is exact on it, or refuses it.

For each family of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (and the ``VARIANTS`` of
tests/family_models.py) a tiny random fp32 model runs unpatched on the full sequence and, patched,
on zigzag shards at ring 2 (two gloo processes; every family in one spawn). Each one must end as:
- exact: logits and loss within 2e-5 relative of the unpatched model. Both sides are fp32 and
  differ only in summation order (we measure <= 1e-6); a token mixer that sees only its shard or
  a position counted locally moves them by 1e-4 (short convolutions) to 1 (positions). The token
  mixers ``hf_ring_attention.mixers`` makes exact (gated delta-net, Mamba2, LFM2's short
  convolutions) are in this group: qwen3_next, qwen3_5, lfm2, bamba, granitemoehybrid, ...;
- refused: ``apply_ring_attention`` raises NotImplementedError naming the feature, and the model
  is left unpatched (attention implementation, hooks, outputs as before);
- skipped: not a text decoder (``family_models.NOT_TEXT_DECODERS``), by name with the reason.
Silently wrong, any other error, or a refusal that comes only during the forward fails the test.
Controls run jamba (Mamba1 mixers, still refused) and llama4_text with ``check_model`` disabled:
they must come out wrong, so the comparison can fail. Ring 3 runs a handful of representative families.

Run: python -m pytest -q tests/test_families.py   (about 3 minutes on 2 shared cores)
Regenerate docs/families.md: HRA_WRITE_FAMILIES_DOC=1 python -m pytest -q tests/test_families.py -k ring2
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import hf_ring_attention as hra
from dist_utils import run_ranks
from family_models import NOT_TEXT_DECODERS, VARIANTS, VOCAB, tiny_family_model
from models import token_batch

TOL = 2e-5
CONTROLS = ("jamba", "llama4_text")  # run with check_model disabled: must come out "wrong"
# Families whose token mixers install_mixers makes exact (hf_ring_attention.mixers.MIXERS).
MIXER_FAMILIES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "lfm2", "lfm2_moe", "lfm3", "bamba",
                  "granitemoehybrid")
RING3 = ("llama", "mistral", "qwen2 (mixed sliding layers)", "gemma3_text", "deepseek_v3")
DOC = Path(__file__).resolve().parent.parent / "docs" / "families.md"


def _families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [f for f in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if f not in NOT_TEXT_DECODERS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _unpatched(model, before, ids, ref_logits) -> str | None:
    """Why a refused model is not left as it was (None if it is)."""
    if model.config._attn_implementation != before[0] or len(model._forward_pre_hooks) != before[1]:
        return "attention implementation or forward hooks changed"
    if hasattr(model, "_hf_ring_saved") or any(hasattr(m, "_hf_ring_state") for m in model.modules()):
        return "ring state left on the model"
    hra.remove_ring_attention(model)  # a no-op on a refused model
    if not torch.equal(model(input_ids=ids, use_cache=False).logits, ref_logits):
        return "outputs changed"
    return None


def _one(name: str, ids: torch.Tensor, groups, ring: int, checked: bool) -> dict:
    """Outcome of one family on this rank (every rank computes the same, collectives agree)."""
    n = ids.shape[1]
    try:
        model = tiny_family_model(name)
        ref = model(input_ids=ids, labels=ids, use_cache=False)
    except Exception as e:  # noqa: BLE001 - reported by name with the reason
        return {"kind": "build failed", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    before = (model.config._attn_implementation, len(model._forward_pre_hooks))
    check = hra.integration.check_model
    if not checked:
        hra.integration.check_model = lambda model: None
    try:
        hra.apply_ring_attention(model, groups, loss_chunk_size=None)  # transformers' logits, to compare
    except NotImplementedError as e:
        whats = [what for what, _ in hra.compat.unsupported_features(model)] or [str(e).splitlines()[0]]
        bad = _unpatched(model, before, ids, ref.logits)
        return {"kind": "refused" if bad is None else "error", "detail": "; ".join(whats) if bad is None else
                f"refused but not left unpatched: {bad}"}
    except Exception as e:  # noqa: BLE001 - a crash in apply is a failure, reported
        return {"kind": "error", "detail": f"apply_ring_attention: {type(e).__name__}: {str(e)[:200]}"}
    finally:
        hra.integration.check_model = check
    status, outcome = 0, None
    try:
        out = model(**hra.shard_batch({"input_ids": ids, "labels": ids}, groups))
    except NotImplementedError as e:
        status, outcome = 1, {"kind": "late refusal", "detail": str(e).splitlines()[0][:200]}
    except Exception as e:  # noqa: BLE001
        status, outcome = 1, {"kind": "error", "detail": f"forward: {type(e).__name__}: {str(e)[:200]}"}
    every = [torch.zeros(1, dtype=torch.int64) for _ in range(ring)]
    dist.all_gather(every, torch.tensor([status]), group=groups.ring_group)  # ranks agree before the gathers
    if any(int(s) for s in every):
        return outcome or {"kind": "error", "detail": "another rank failed in the forward"}
    logits = hra.zigzag_unshard(out.logits.detach(), dim=1, group=groups.ring_group)[:, :n]
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=groups.ring_group)  # each rank's loss is scaled so that the mean is the loss
    errors = (_rel(logits, ref.logits.detach()), abs(loss.item() / ring - ref.loss.item()) / abs(ref.loss.item()))
    kind = "exact" if max(errors) < TOL else "wrong"
    return {"kind": kind, "detail": f"logits {errors[0]:.1e}, loss {errors[1]:.1e} (relative)", "errors": errors}


def _sweep(rank: int, ring: int, names: list[str], controls: tuple[str, ...], length: int) -> dict:
    import logging
    import warnings

    logging.disable(logging.WARNING)  # tiny configs make transformers chatty
    warnings.filterwarnings("ignore")
    groups = hra.setup_groups(ring)
    ids = token_batch(length, vocab=VOCAB)  # (2, length): not a multiple of 2 * ring, shard_batch pads
    results, start = {}, time.monotonic()
    for name in names:
        results[name] = _one(name, ids, groups, ring, checked=True)
    for name in controls:
        results[f"control: {name} unchecked"] = _one(name, ids, groups, ring, checked=False)
    results["_seconds"] = time.monotonic() - start
    return results


def _failures(results: dict) -> list[str]:
    return [f"{name}: {r['kind']}: {r['detail']}" for name, r in results.items()
            if not name.startswith(("control", "_")) and r["kind"] not in ("exact", "refused", "build failed")]


def test_every_family_exact_or_refused_ring2():
    names = _families() + list(VARIANTS)
    results = run_ranks(_sweep, 2, names, CONTROLS, 2 * 2 * 8 - 1, timeout=900)[0]
    if os.environ.get("HRA_WRITE_FAMILIES_DOC"):
        _write_doc(results)
    assert not _failures(results), "\n".join(_failures(results))
    for name in CONTROLS:  # the comparison catches a model the check lets through
        assert results[f"control: {name} unchecked"]["kind"] == "wrong", results[f"control: {name} unchecked"]
    # Families the project promises, and the silently-wrong families that started this sweep.
    for name in ("llama", "mistral", "qwen2 (mixed sliding layers)", "gemma3_text", "deepseek_v3", "qwen3",
                 *MIXER_FAMILIES):
        assert results[name]["kind"] == "exact", (name, results[name])
    for name, feature in [("jamba", "Mamba"), ("falcon_h1", "state-space"), ("nemotron_h", "Mamba"),
                          ("kimi_linear", "gated delta-net"), ("minimax", "lightning"),
                          ("llama4_text", "chunked attention"), ("gpt_oss", "attention sinks")]:
        assert results[name]["kind"] == "refused" and feature in results[name]["detail"], (name, results[name])


def test_representative_families_exact_ring3():
    results = run_ranks(_sweep, 3, list(RING3), (), 2 * 3 * 6 - 1, timeout=600)[0]
    bad = [f"{name}: {r['kind']}: {r['detail']}" for name, r in results.items()
           if name != "_seconds" and r["kind"] != "exact"]
    assert not bad, "\n".join(bad)


def _write_doc(results: dict) -> None:
    import transformers

    rows = {k: v for k, v in results.items() if not k.startswith(("control", "_"))}
    by_kind = {kind: sorted(n for n, r in rows.items() if r["kind"] == kind) for kind in
               ("exact", "refused", "build failed")}
    lines = [
        "# Model families: exact on the ring, or refused",
        "",
        f"Generated by `tests/test_families.py` (transformers {transformers.__version__}, ring 2, fp32 tiny random "
        f"models; exact = logits and loss within {TOL:g} relative of the unpatched model). Regenerate with "
        "`HRA_WRITE_FAMILIES_DOC=1 python -m pytest -q tests/test_families.py -k ring2`.",
        "",
        f"**{len(by_kind['exact'])} exact, {len(by_kind['refused'])} refused, {len(NOT_TEXT_DECODERS)} skipped"
        + (f", {len(by_kind['build failed'])} failed to build" if by_kind["build failed"] else "") + ".**",
        "Refused models raise `NotImplementedError` in `apply_ring_attention` (see `hf_ring_attention/compat.py`) "
        "and stay unpatched.",
        "",
        "## Exact",
        "",
        ", ".join(f"`{n}`" for n in by_kind["exact"]),
        "",
        "## Refused (feature found)",
        "",
        "| family | feature |",
        "|---|---|",
        *[f"| `{n}` | {rows[n]['detail'].replace('|', '/')} |" for n in by_kind["refused"]],
        "",
        "## Skipped: not a text decoder",
        "",
        "| family | reason |",
        "|---|---|",
        *[f"| `{n}` | {reason} |" for n, reason in sorted(NOT_TEXT_DECODERS.items())],
    ]
    if by_kind["build failed"]:
        lines += ["", "## Failed to build a tiny model", "", "| family | error |", "|---|---|",
                  *[f"| `{n}` | {rows[n]['detail']} |" for n in by_kind["build failed"]]]
    DOC.write_text("\n".join(lines) + "\n")
