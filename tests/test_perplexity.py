"""Ring-sharded perplexity equals a plain single-process computation on the same windows.

Tiny Llama (GQA) and Mistral (sliding window 12 < context length) models; ring sizes 2 and 4,
and ring 2 x data-parallel 2 with an odd number of windows (rings do unequal work); lengths
13 (not a multiple of 2 * ring: shard_batch pads) and 16; non-overlapping and strided windows;
a dynamic-NTK RoPE model (its frequencies depend on the input length and on the longest input
seen before). Every rank evaluates several times in one process, so the checks also cover
state left behind by earlier calls.

Tolerance: 1e-4 relative on the NLL sum and the perplexity, exact on token counts. Both sides
are fp32 with different summation orders (ring merge, chunked LM head, fp64 sums); we measure
<= 1e-7 on the NLL and 1e-6 on the perplexity. Errors this catches, measured on these models:
misaligned targets 1e-1; RoPE seeing a rank's own or the padded length 5e-3; dynamic RoPE
reusing the frequencies of a longer earlier window 3e-2.
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_ring_attention as hra
from hf_ring_attention.perplexity import evaluate_perplexity
from dist_utils import run_ranks
from models import tiny_model, token_batch

TOKENS = 61
CASES = [  # (context_lengths, stride, max_windows)
    ([13, 16], None, None),
    ([13], 5, 7),  # 7 strided windows: split 4 / 3 over two data-parallel rings
    ([40, 16], None, 1),  # one window per length: the second data-parallel ring has none
]
DYNAMIC_CASES = [([40, 13], None, None)]  # longest first: scoring 13 must not reuse 40's frequencies
RTOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on 2 threads wait on each other when the cores are busy (16 ms instead of
    6 us per op under load); the references here run on one thread, like the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dynamic_llama():
    """Tiny Llama with dynamic NTK RoPE and max_position_embeddings 8 < every context length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _model(name: str):
    """A tiny model with weights of std 0.5 (seeded): the default init (0.02) gives near-uniform
    predictions that hide RoPE and attention errors (a dynamic-RoPE frequency error moves its NLL
    by 3e-7 relative at init 0.02, by 8e-3 here)."""
    model = _dynamic_llama() if name == "dynamic" else tiny_model(name).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # embeddings and linear layers; norms stay 1
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@torch.no_grad()
def _reference(name, ids, lengths, stride, max_windows) -> list[tuple[int, float]]:
    """(scored tokens, NLL sum) per length from full logits of a fresh unpatched model, one window at a time."""
    out = []
    for length in lengths:
        model = _model(name)  # fresh per length: dynamic RoPE keeps state from longer inputs
        step = stride or length
        nll, count, start, k = 0.0, 0, 0, 0
        while start + length <= ids.numel() and (max_windows is None or k < max_windows):
            window = ids[start:start + length]
            logits = model(input_ids=window[None]).logits[0].double()  # (L, V)
            first = 1 if k == 0 else max(1, length - step)  # first target position scored
            nll += torch.nn.functional.cross_entropy(logits[first - 1:-1], window[first:], reduction="sum").item()
            count += length - first
            start, k = start + step, k + 1
        out.append((count, nll))
    return out


def _check(results, expected, what):
    for r, (count, nll) in zip(results, expected):
        assert r.tokens == count, f"{what} L={r.context_length}: scored {r.tokens} tokens, expected {count}"
        assert abs(r.nll - nll) <= RTOL * abs(nll), f"{what} L={r.context_length}: nll {r.nll} vs {nll}"
        assert abs(r.perplexity - math.exp(nll / count)) <= RTOL * r.perplexity, what


def _as_tuples(results):
    return [(r.context_length, r.tokens, r.nll, r.perplexity, r.windows, r.stride) for r in results]


def _ring_worker(rank, world, setups):
    """Evaluate every (model, ring size) setup on every case; returns {(name, ring): [results per case]}."""
    ids = token_batch(TOKENS, batch=1)[0]
    out = {}
    for name, ring in setups:
        groups = hra.setup_groups(ring)
        model = hra.apply_ring_attention(_model(name), groups)
        cases = CASES if name != "dynamic" else DYNAMIC_CASES
        out[(name, ring)] = [_as_tuples(evaluate_perplexity(model, ids, lengths, groups=groups, stride=stride,
                                                            max_windows=mw, progress=False))
                             for lengths, stride, mw in cases]
    return out


def _compare(world, setups):
    per_rank = run_ranks(_ring_worker, world, setups)
    assert all(r == per_rank[0] for r in per_rank), "ranks returned different results"
    ids = token_batch(TOKENS, batch=1)[0]
    for (name, ring), per_case in per_rank[0].items():
        cases = CASES if name != "dynamic" else DYNAMIC_CASES
        for (lengths, stride, mw), got in zip(cases, per_case):
            expected = _reference(name, ids, lengths, stride, mw)
            results = [hra.perplexity.PerplexityResult(*t) for t in got]
            _check(results, expected, f"{name} ring={ring} dp={world // ring} stride={stride}")


def test_ring2_llama_mistral_dynamic_rope_match_unsharded():
    _compare(2, [("llama", 2), ("mistral", 2), ("dynamic", 2)])


def test_ring4_and_ring2_x_dp2_match_unsharded():
    _compare(4, [("llama", 4), ("llama", 2)])


def test_single_process_matches_unsharded_and_counts_windows():
    ids = token_batch(TOKENS, batch=1)[0]
    for name in ("llama", "dynamic"):  # dynamic: L=13 is padded to 14, which must not change RoPE
        model = _model(name)
        for lengths, stride, mw in CASES:
            results = evaluate_perplexity(model, ids, lengths, stride=stride, max_windows=mw, progress=False)
            _check(results, _reference(name, ids, lengths, stride, mw), f"{name} ring=1 stride={stride}")
    assert [(r.windows, r.stride) for r in evaluate_perplexity(model, ids, [13, 16], progress=False)] == \
        [(4, 13), (3, 16)]
    assert model.training is False


@pytest.mark.parametrize("kwargs, match", [
    (dict(context_lengths=[62]), "longer than the text"),
    (dict(context_lengths=[0]), "must be an int >= 2"),
    (dict(context_lengths=[]), "non-empty list"),
    (dict(context_lengths=[16], stride=0), "stride=0 must be a positive int"),
    (dict(context_lengths=[16], stride=17), "stride=17 is larger than context length 16"),
    (dict(context_lengths=[16], max_windows=0), "max_windows=0"),
    (dict(token_ids=token_batch(16)), "1-D integer tensor"),
    (dict(token_ids=torch.arange(90, 110)), r"must be in \[0, 96\)"),
    (dict(groups=hra.RingGroups(None, 0, 2, None, 0, 1)), "apply_ring_attention"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(token_ids=token_batch(TOKENS, batch=1)[0], context_lengths=[16]) | kwargs
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        evaluate_perplexity(model, args.pop("token_ids"), args.pop("context_lengths"), **args)


def test_logit_softcapping_refused():
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        evaluate_perplexity(model, token_batch(TOKENS, batch=1)[0], [16])


def test_plot_uses_log_y_when_values_span_more_than_10x(tmp_path):
    import importlib.util
    import os

    pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install -e '.[demo]'")
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "eval_perplexity.py")
    spec = importlib.util.spec_from_file_location("eval_perplexity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import matplotlib.pyplot as plt

    seen = []
    real_close = plt.close
    plt.close = lambda fig: (seen.append(fig.axes[0].get_yscale()), real_close(fig))
    try:
        for rows, want in (([("a", 1024, 3.2), ("a", 2048, 325.0)], "log"), ([("a", 1024, 3.2), ("b", 1024, 4.1)], "linear")):
            csv_path = tmp_path / f"{want}.csv"
            csv_path.write_text("label,context_length,perplexity\n" + "".join(f"{l},{c},{p}\n" for l, c, p in rows))
            png = mod.plot_results(str(csv_path), str(tmp_path / f"{want}.png"))
            assert os.path.getsize(png) > 1000
            assert seen[-1] == want
    finally:
        plt.close = real_close
