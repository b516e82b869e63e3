"""Generation over the ring on CPU: prefill time, decode tokens/s, KV-cache bytes per rank.

Run (the issue's target; about 4 minutes on 2 idle cores):
    python benchmarks/bench_generate.py --seq 16384 --ring-sizes 1,2 --new-tokens 32 --repeats 2
Quick check (seconds):
    python benchmarks/bench_generate.py --seq 2048 --ring-sizes 1,2 --new-tokens 8 --repeats 1

Model: a small Llama built in code (hidden 512, 4 layers, 8 query / 2 kv heads, head dim 64,
MLP 1024, vocab 4096, fp32), so that attention is most of a long prefill's work (at N = 16384
about 80% of the FLOPs). Every configuration runs in fresh processes with --threads threads each:
- baseline: one process, the unpatched model (SDPA, transformers' DynamicCache) through
  ``model.generate``;
- ring C: C processes, ``hf_ring_attention.ring_generate`` (ring 1 = the same code in one process).
Each run is one ``generate`` call, greedy, ``--new-tokens`` tokens (eos off); a stopping criterion
timestamps every step (wall and CPU time), so:
- prefill: from the call to the first token (prompt forward + first token), slowest rank;
- decode tokens/s: tokens 2..T over the time between the first and the last step, slowest rank;
- CPU columns: the busiest rank's CPU time for the same spans;
- KV cache/rank: bytes of K/V the largest rank holds at the end (ring: its shard).
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import json
import time

import torch
import torch.distributed as dist


def make_model(layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 17,
                         attention_dropout=0.0, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


class Clock:
    """A stopping criterion that never stops: it timestamps each generation step (wall, CPU)."""

    def __init__(self):
        self.marks = []

    def __call__(self, input_ids, scores, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_case(rank, world, c):
    """One configuration on one rank: per repeat (prefill wall, prefill cpu, decode wall, decode cpu), cache bytes."""
    import hf_ring_attention as hra
    from transformers import StoppingCriteriaList

    model = make_model(c["layers"], c["vocab"])
    ids = torch.randint(0, c["vocab"], (1, c["seq"]), generator=torch.Generator().manual_seed(1))  # (1, N)
    groups = hra.setup_groups(world) if c["kind"] == "ring" else None
    runs = []
    for i in range(c["warmup"] + c["repeats"]):
        clock = Clock()
        kw = dict(max_new_tokens=c["new"], min_new_tokens=c["new"], do_sample=False, eos_token_id=None,
                  pad_token_id=None, return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([clock]))
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if c["kind"] == "ring":
            out = hra.ring_generate(model, ids, groups, **kw)
            cache_bytes = out.cache.nbytes()
        else:
            out = model.generate(ids, **kw)
            cache_bytes = sum(t.numel() * t.element_size() for layer in out.cache.layers for t in (layer.keys, layer.values))
        (w1, c1), (wn, cn) = clock.marks[0], clock.marks[-1]
        if i >= c["warmup"]:
            runs.append((w1 - t0, c1 - c0, wn - w1, cn - c1))
        del out
    return dict(runs=runs, cache_bytes=cache_bytes)


def summarise(per_rank, new_tokens):
    med = lambda j: [_common.median([r[j] for r in x["runs"]]) for x in per_rank]  # noqa: E731 - per rank
    steps = new_tokens - 1
    return dict(prefill=max(med(0)), prefill_cpu=max(med(1)), decode_tps=steps / max(med(2)),
                decode_cpu_per_token=max(med(3)) / steps, cache=max(x["cache_bytes"] for x in per_rank),
                raw=[x["runs"] for x in per_rank])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=16384, help="prompt length N")
    p.add_argument("--ring-sizes", default="1,2")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per run (>= 2)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (baseline too)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0, help="untimed runs first (the first call imports modules)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is measured from the second token on)")
    base = dict(seq=args.seq, new=args.new_tokens, layers=args.layers, vocab=args.vocab, repeats=args.repeats,
                warmup=args.warmup)
    load_before, t_start = _common.load_average(), time.time()
    rows = []
    if not args.no_baseline:
        print("# unpatched model.generate (SDPA, DynamicCache), 1 process ...", flush=True)
        rows.append(dict(impl="generate (SDPA)", procs=1, **summarise(
            _common.spawn(run_case, 1, dict(base, kind="sdpa"), threads=args.threads), args.new_tokens)))
    for c in [int(x) for x in args.ring_sizes.split(",")]:
        print(f"# ring_generate, ring {c} ...", flush=True)
        rows.append(dict(impl="ring_generate", procs=c, **summarise(
            _common.spawn(run_case, c, dict(base, kind="ring"), threads=args.threads), args.new_tokens)))
    load_after = _common.load_average()
    ref = rows[0]
    for r in rows:
        r["p"] = f"{r['prefill']:.2f}"
        r["pc"] = f"{r['prefill_cpu']:.2f}"
        r["sp"] = f"{ref['prefill'] / r['prefill']:.2f}x"
        r["spc"] = f"{ref['prefill_cpu'] / r['prefill_cpu']:.2f}x"
        r["d"] = f"{r['decode_tps']:.1f}"
        r["dc"] = f"{1000 * r['decode_cpu_per_token']:.1f}"
        r["kv"] = f"{r['cache'] / 2**20:.1f}"
    cols = [("impl", "impl"), ("procs", "procs"), ("p", "prefill (s)"), ("sp", "prefill speedup"),
            ("pc", "prefill CPU s (busiest rank)"), ("spc", "CPU-time speedup"), ("d", "decode tokens/s"),
            ("dc", "decode CPU ms/token"), ("kv", "KV cache/rank (MiB)")]
    print(f"\nN={args.seq}, Llama hidden 512, {args.layers} layers, 8/2 heads, D=64, vocab {args.vocab}, fp32, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s) per process, median of {args.repeats} "
          f"(+{args.warmup} warm-up); torch {torch.__version__}; load avg before: {load_before}, after: "
          f"{load_after}; {time.time() - t_start:.0f} s in all; speedups against the first row\n")
    print(_common.markdown_table(rows, cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), load_before=load_before, load_after=load_after,
                           rows=[{k: v for k, v in r.items() if k not in {c for c, _ in cols[2:]}} for r in rows]),
                      f, indent=1)


if __name__ == "__main__":
    main()
