"""Training step (forward + backward + AdamW step, fp32) of a Llama model over the ring, on CPU (gloo).

Run (the README's tables; 405 s on this 2-core machine with other jobs on it, about 5 minutes idle):
    python benchmarks/bench_train.py --seqs 4096,8192 --ring-sizes 1,2 --sdpa --repeats 2 \
        --mem-cap-mib 192 --search-rings 1,2
Quick check (about a minute on idle cores, 2 with other jobs running):
    python benchmarks/bench_train.py --seqs 1024 --ring-sizes 1,2 --repeats 1 --mem-cap-mib 64 \
        --search-rings 1,2 --search-start 512
Longest length at ring 1, 2 and 4 under a small cap (memory only; about 2.5 minutes; ring 4 runs 4
processes on 2 cores, so add it to --ring-sizes only for memory, its times are oversubscribed):
    python benchmarks/bench_train.py --seqs "" --search-rings 1,2,4 --mem-cap-mib 64 --search-start 512
What the full logits cost (the same loss, LM head + cross-entropy in checkpointed chunks):
    python benchmarks/bench_train.py --seqs 4096 --ring-sizes 1,2 --repeats 1 --search-rings "" --loss chunked
The embedded SmolLM2-135M instead of the small model (vocab 49152: its logits dominate memory;
about 18 s per step at N=512 on one core):
    python benchmarks/bench_train.py --model demo --seqs 512 --ring-sizes 1,2 --repeats 1 --search-rings ""

Model: by default a randomly initialised ``LlamaForCausalLM`` built in code (seed 0, the same
weights on every rank): hidden 256, 4 layers, 8 query heads / 2 kv heads (head dim 32),
intermediate 688, vocab 4096, untied embeddings: 4.9 M parameters. Per token and layer the
forward costs about 1.4 MFLOP outside attention (projections + MLP) and 512 * N FLOP in causal
attention (QK^T and PV over on average N / 2 keys), plus 2.1 MFLOP per token for the LM head:
attention is most of the work from N ~ 4k on, as it is for real models at long context.
``--model demo``: SmolLM2-135M-Instruct (``hf_ring_attention.demo.demo_model_dir()``; 30 layers,
9 / 3 heads, vocab 49152, tied embeddings).

One training step, every rank, the package's real path: ``setup_groups(C)``,
``apply_ring_attention(model, groups)``, ``shard_batch`` of one random row of N tokens
(labels = input ids; the same row on every rank of the ring), ``loss = model(**shard).loss``
(transformers' loss: S_local x vocab fp32 logits, cross-entropy summed / num_items_in_batch),
``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``. With C > 1
the model is wrapped in ``DistributedDataParallel`` (what accelerate's ``prepare`` does), so the
gradient all-reduce over the ring (needed: every rank holds part of each weight's gradient) is
included in the time and its buckets in the memory; ``--grad-sync none`` leaves it out. Gradient
checkpointing (transformers', non-reentrant) is on unless ``--no-checkpointing``. The
single-process rows are the same code with C = 1 (the ring's own kernel on the full sequence);
``--sdpa`` adds rows with transformers' SDPA attention instead (no ring code at all).
``--loss chunked`` (not the package, a what-if): the decoder as usual, then the LM head and
cross-entropy on ``--loss-chunk`` rows at a time, each chunk checkpointed, so the S_local x
vocab logits never exist at once; the same loss value.

Reported per configuration (fresh processes, ``--threads`` intra-op threads each):
- tokens/s: N / the slowest rank's median step time (ranks start each step after a barrier);
  speedup: against 1 process x 1 thread at the same N (the ``--single-threads`` rows);
- fwd / bwd / opt: the slowest rank's median time of forward (incl. loss), backward (incl.
  checkpoint recomputation and DDP's all-reduce), optimizer step;
- attention s: the slowest rank's median time in the ring's block kernels and its waits for
  messages (timed through the package's seams: a timing ``Kernel`` and ``RingOptions(comm=...)``;
  the forward runs twice with checkpointing); merges and planning are not in it;
- peak mem/rank: the largest per-rank peak RSS above the RSS right before the step, after
  ``--warmup`` steps at the same N (AdamW's state exists by then, so it is in the baseline, as
  are weights and libraries; gradients, DDP buckets, activations, logits and all scratch are
  in the peak). glibc's mmap threshold is pinned (see _common.py);
- logits/rank: the size of ONE S_local x vocab fp32 tensor. The loss keeps log-softmax for
  backward and backward makes its gradient and the logits' gradient, so about 3 such tensors
  are alive at the peak (with the default small model that is most of the peak);
- base RSS: the absolute RSS before the step (weights, AdamW state, libraries).

Longest length under ``--mem-cap-mib`` (per rank, the peak above defined as above), per ring
size in ``--search-rings``: inside one set of C processes, one warm-up step at the first
length, then one measured step per probed length (the max over ranks is compared with the
cap). Lengths are multiples of 2 * C * 64; doubling from ``--search-start`` until a length does
not fit, then bisection (the next probe is interpolated linearly from the two bracketing peaks,
kept within the middle half of the bracket) until the bracket is within 1/``--search-resolution``
of the lower end or one step. "fits": measured per-rank peak <= cap.

Timing on this 2-core machine: ring 2 uses both cores, the 1 x 1 baseline one; ring 4 puts 4
single-thread processes on 2 cores, so its times are oversubscribed (memory is still per rank
and meaningful). Other load on the machine slows every figure: load averages are printed.
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import gc
import json
import time

import torch
import torch.distributed as dist

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)


def build_model(c):
    """The model of configuration ``c`` in fp32, training mode, the same weights on every rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    attn = "sdpa" if c["attn"] == "sdpa" else "eager"  # eager is only a placeholder: the ring replaces it
    if c["model"] == "demo":
        from hf_ring_attention.demo import demo_model_dir

        model = LlamaForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32, attn_implementation=attn)
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(**c["small"], max_position_embeddings=1 << 20, tie_word_embeddings=False,
                          attention_dropout=0.0, use_cache=False, attn_implementation=attn)
        model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    model.train()
    if c["checkpointing"]:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers' name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return model


def _chunk_nll(hidden, weight, targets):
    """Summed cross-entropy of one chunk of rows: (B, c, H) hidden -> fp32 logits -> loss."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


class ChunkedLossLM(torch.nn.Module):
    """``--loss chunked``: the same loss as transformers', without the S_local x vocab logits.

    The decoder runs as usual; the LM head and cross-entropy run on ``chunk`` rows at a time,
    each chunk checkpointed (its logits are recomputed in backward), so at most one chunk's
    logits (and their gradient) are alive. Not part of the package: it shows what the logits cost.
    """

    def __init__(self, lm, chunk):
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, position_ids, shift_labels, num_items_in_batch, labels=None, **kwargs):
        from torch.utils.checkpoint import checkpoint
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               **kwargs).last_hidden_state  # (B, S_local, H)
        weight = self.lm.get_output_embeddings().weight
        total = sum(checkpoint(_chunk_nll, hidden[:, i:i + self.chunk], weight, shift_labels[:, i:i + self.chunk],
                               use_reentrant=False) for i in range(0, hidden.shape[1], self.chunk))
        return CausalLMOutput(loss=total / num_items_in_batch)


ATTN_TIME = [0.0]  # seconds in the ring's block kernels and its waits for messages


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            ATTN_TIME[0] += time.perf_counter() - t0
    return wrapper


class _TimedComm:
    """A ``RingOptions.comm`` that times the waits of ``RingComm`` (benchmark only)."""

    def __init__(self, group, **kwargs):
        from hf_ring_attention.comm import RingComm

        self._comm = RingComm(group, **kwargs)
        self.send_recv = self._comm.send_recv
        self.wait = _timed(self._comm.wait)


def _timed_ring(model, groups):
    """Patch the model with the ring, timing its block kernels and message waits through the package's seams
    (a Kernel object and RingOptions.comm), not by replacing its functions."""
    from hf_ring_attention import RingOptions, apply_ring_attention
    from hf_ring_attention.kernels import Kernel, select_kernel

    k = select_kernel(next(model.parameters()))  # the kernel "auto" picks for this device and dtype
    apply_ring_attention(model, groups, kernel=Kernel(_timed(k.forward), _timed(k.backward)),
                         options=RingOptions(comm=_TimedComm))


def run_rank(rank, world, c):
    """One configuration on one rank (``world`` = ring size C). c: see main. Returns measurements."""
    from hf_ring_attention import setup_groups, shard_batch

    torch.manual_seed(0)
    model = build_model(c)
    groups = setup_groups(world)
    if c["attn"] == "ring":
        _timed_ring(model, groups)
    n_params = sum(p.numel() for p in model.parameters())
    train_model = ChunkedLossLM(model, c["loss_chunk"]) if c["loss"] == "chunked" else model
    if world > 1 and c["grad_sync"] == "ddp":
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size

    def shard_for(n):
        g = torch.Generator().manual_seed(1234 + n)  # same row on every rank of the ring
        ids = torch.randint(0, vocab, (c["batch"], n), generator=g)
        return shard_batch({"input_ids": ids, "labels": ids}, groups)

    def step(shard):
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        ATTN_TIME[0] = 0.0
        loss = train_model(**shard).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return dict(wall=t3 - t0, cpu=time.process_time() - c0, fwd=t1 - t0, bwd=t2 - t1, opt=t3 - t2,
                    attn_s=ATTN_TIME[0], loss=float(loss.detach()))

    def measured(n, repeats):
        gc.collect()
        mem = _common.PeakRSS()
        mem.start()
        shard = shard_for(n)
        steps = [step(shard) for _ in range(repeats)]
        peak = mem.peak()
        del shard
        return dict(steps=steps, peak_rss=peak, base_rss=mem.base)

    if c["mode"] == "throughput":
        for _ in range(c["warmup"]):  # imports modules, creates AdamW's state, grows the heap
            step(shard_for(c["seq"]))
        out = measured(c["seq"], c["repeats"])
        out["params"] = n_params
        if c["torch_mem"]:
            if world > 1:
                dist.barrier()
            shard = shard_for(c["seq"])
            out["torch_peak"] = _common.torch_peak_bytes(lambda: step(shard))
        return out

    # mode "search": longest length whose per-rank peak fits the cap
    cap, gran = c["cap_bytes"], 2 * world * 64
    up = lambda n: max(gran, -(-n // gran) * gran)
    down = lambda n: max(gran, int(n) // gran * gran)
    probes = []

    def probe(n):
        r = measured(n, 1)
        peak = torch.tensor([r["peak_rss"]], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        probes.append(dict(seq=n, peak=float(peak), base_rss=r["base_rss"], time=r["steps"][0]["wall"]))
        return float(peak)

    n = up(c["search_start"])
    for _ in range(c["warmup"]):
        step(shard_for(n))
    lo = hi = None  # (length, peak) of the longest fitting / shortest failing length so far
    while True:  # doubling from the start (halving while even the start does not fit)
        p = probe(n)
        if p <= cap:
            lo = (n, p)
            if hi is not None:
                break
            n *= 2
        else:
            hi = (n, p)
            if lo is not None or n == gran:
                break
            n = down(n // 2)
    while lo is not None and hi is not None and hi[0] - lo[0] > max(gran, lo[0] / c["resolution"]):
        guess = lo[0] + (cap - lo[1]) / max(hi[1] - lo[1], 1.0) * (hi[0] - lo[0])
        quarter = (hi[0] - lo[0]) / 4
        n = down(min(max(guess, lo[0] + quarter), hi[0] - quarter))
        n = min(max(n, lo[0] + gran), hi[0] - gran)
        p = probe(n)
        if p <= cap:
            lo = (n, p)
        else:
            hi = (n, p)
    return dict(longest=lo, shortest_failing=hi, probes=probes, params=n_params)


def summarise(per_rank):
    med = lambda key: [_common.median([s[key] for s in r["steps"]]) for r in per_rank]
    out = dict(time=max(med("wall")), cpu=max(med("cpu")), fwd=max(med("fwd")), bwd=max(med("bwd")),
               opt=max(med("opt")), attn_s=max(med("attn_s")), peak=max(r["peak_rss"] for r in per_rank),
               peak_per_rank=[r["peak_rss"] for r in per_rank], base=max(r["base_rss"] for r in per_rank),
               loss=per_rank[0]["steps"][-1]["loss"], params=per_rank[0]["params"])
    if "torch_peak" in per_rank[0]:
        out["torch_peak"] = max(r["torch_peak"] for r in per_rank)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=["small", "demo"],
                   help="small: the Llama config below, random weights; demo: SmolLM2-135M")
    p.add_argument("--vocab", type=int, default=SMALL["vocab_size"])
    p.add_argument("--hidden", type=int, default=SMALL["hidden_size"])
    p.add_argument("--intermediate", type=int, default=SMALL["intermediate_size"])
    p.add_argument("--layers", type=int, default=SMALL["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=SMALL["num_attention_heads"])
    p.add_argument("--kv-heads", type=int, default=SMALL["num_key_value_heads"])
    p.add_argument("--seqs", default="4096,8192", help="comma-separated global sequence lengths N")
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--ring-sizes", default="1,2", help="comma-separated ring sizes for the tokens/s table")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per ring process")
    p.add_argument("--single-threads", default="1",
                   help="thread counts of the 1-process rows (e.g. 1,2); speedups are against 1")
    p.add_argument("--sdpa", action="store_true", help="also 1-process rows with transformers' SDPA attention")
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--grad-sync", default="ddp", choices=["ddp", "none"],
                   help="ddp: wrap in DistributedDataParallel when C > 1; none: no gradient all-reduce")
    p.add_argument("--loss", default="hf", choices=["hf", "chunked"],
                   help="hf: model(**shard).loss (full logits); chunked: LM head + loss in checkpointed chunks")
    p.add_argument("--loss-chunk", type=int, default=1024, help="rows per chunk for --loss chunked")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch-mem", action="store_true", help="also count live torch allocations (profiler)")
    p.add_argument("--mem-cap-mib", type=float, default=192, help="per-rank cap of the longest-length search")
    p.add_argument("--search-rings", default="1,2", help="ring sizes to search (empty: no search)")
    p.add_argument("--search-start", type=int, default=2048, help="first length probed")
    p.add_argument("--search-resolution", type=float, default=16,
                   help="stop when the bracket is within (lower end / this) or one step of 2*C*64")
    p.add_argument("--json", default=None, help="write all measurements to this path")
    args = p.parse_args()

    seqs = [int(x) for x in args.seqs.split(",") if x]
    rings = [int(x) for x in args.ring_sizes.split(",") if x]
    singles = [int(x) for x in args.single_threads.split(",") if x]
    search_rings = [int(x) for x in args.search_rings.split(",") if x]
    small = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    base = dict(model=args.model, small=small, batch=args.batch, checkpointing=not args.no_checkpointing,
                grad_sync=args.grad_sync, loss=args.loss, loss_chunk=args.loss_chunk, repeats=args.repeats,
                warmup=args.warmup, torch_mem=args.torch_mem)
    if args.model == "demo":
        from transformers import AutoConfig

        from hf_ring_attention.demo import demo_model_dir

        mcfg = AutoConfig.from_pretrained(demo_model_dir())  # converts the GGUF once, before any rank starts
        vocab, desc = mcfg.vocab_size, "SmolLM2-135M-Instruct (demo)"
    else:
        vocab = args.vocab
        desc = (f"LlamaForCausalLM, random init: hidden {args.hidden}, {args.layers} layers, {args.heads} q / "
                f"{args.kv_heads} kv heads, intermediate {args.intermediate}, vocab {args.vocab}")

    load_before = _common.load_average()
    t_start = time.time()
    rows, ref = [], {}
    for n in seqs:
        configs = [("ring", 1, t) for t in singles] + ([("sdpa", 1, t) for t in singles] if args.sdpa else []) \
            + [("ring", c, args.threads) for c in rings if c > 1]
        for attn, c, threads in configs:
            if n % (2 * c):
                p.error(f"--seqs {n} must be a multiple of 2 * ring size ({2 * c})")
            print(f"# N={n}, {attn}, {c} process(es) x {threads} thread(s) ...", flush=True)
            r = summarise(_common.spawn(run_rank, c, dict(base, mode="throughput", seq=n, attn=attn), threads=threads))
            r.update(seq=n, attn=attn, ring=c, threads=threads, tok_s=n * args.batch / r["time"],
                     logits=args.batch * (n // c if args.loss == "hf" else min(n // c, args.loss_chunk)) * vocab * 4)
            if attn == "ring" and c == 1 and threads == 1:
                ref[n] = r
            rows.append(r)
    searches = []
    for c in search_rings:
        print(f"# longest length under {args.mem_cap_mib:g} MiB/rank, ring {c} ...", flush=True)
        t0 = time.time()
        res = _common.spawn(run_rank, c, dict(base, mode="search", attn="ring", cap_bytes=args.mem_cap_mib * 2**20,
                                              search_start=args.search_start, resolution=args.search_resolution),
                            threads=args.threads)[0]
        res.update(ring=c, seconds=time.time() - t0)
        searches.append(res)
    load_after = _common.load_average()

    mib = lambda x: f"{x / 2**20:.0f}"
    for r in rows:
        b = ref.get(r["seq"])
        r["procs"] = f"{r['ring']} x {r['threads']}"
        r["impl"] = "HF SDPA" if r["attn"] == "sdpa" else "ring"
        r["ts"] = f"{r['tok_s']:.0f}"
        r["sp"] = f"{b['time'] / r['time']:.2f}x" if b else ""
        r["spc"] = f"{b['cpu'] / r['cpu']:.2f}x" if b else ""
        r["t"] = f"{r['time']:.2f} ({r['fwd']:.2f} / {r['bwd']:.2f} / {r['opt']:.2f})"
        r["at"] = f"{r['attn_s']:.2f} ({r['attn_s'] / r['time']:.0%})" if r["attn_s"] else ""
        r["mem"] = mib(r["peak"]) + (f" ({mib(r['torch_peak'])})" if "torch_peak" in r else "")
        r["mr"] = f"{r['peak'] / b['peak']:.2f}" if b else ""
        r["lg"] = mib(r["logits"])
        r["bs"] = mib(r["base"])
    cols = [("seq", "N"), ("impl", "attention"), ("procs", "procs x threads"), ("ts", "tokens/s"),
            ("sp", "speedup vs 1x1"), ("spc", "cpu-time speedup"), ("t", "step s (fwd / bwd / opt)"),
            ("at", "attention s"),
            ("mem", "peak mem/rank (MiB)"), ("mr", "mem vs 1x1"), ("lg", "logits/rank (MiB)"),
            ("bs", "base RSS (MiB)")]
    print()
    n_params = (rows or searches)[0]["params"] if rows or searches else 0
    print(f"{desc}; {n_params / 1e6:.1f} M parameters; fp32, batch {args.batch}, AdamW, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}, gradient all-reduce: "
          f"{'DDP' if args.grad_sync == 'ddp' else 'none'} (C > 1); loss: "
          f"{'transformers (full logits)' if args.loss == 'hf' else f'chunked, {args.loss_chunk} rows'}; "
          f"median of {args.repeats} steps "
          f"(+{args.warmup} warm-up); torch {torch.__version__}; load avg before: {load_before}, after: "
          f"{load_after}; {time.time() - t_start:.0f} s in all")
    if any(c > 2 for c in rings + search_rings):
        print("ring 4 runs 4 single-thread processes on this machine's 2 cores: oversubscribed, its times "
              "are not what 4 cores would give")
    print("peak mem/rank: peak RSS above the RSS right before the step (weights, AdamW state, libraries excluded: "
          "see base RSS); logits/rank: one S_local x vocab fp32 tensor (chunked loss: one chunk); attention s: time "
          "in the ring's block kernels and message waits (forward, checkpoint recompute, backward)" +
          ("; in brackets: live torch allocations" if args.torch_mem else ""))
    if rows:
        print()
        print(_common.markdown_table(rows, cols))
    if searches:
        r1 = next((s for s in searches if s["ring"] == 1 and s["longest"]), None)
        srows = []
        for s in searches:
            lo, hi = s["longest"], s["shortest_failing"]
            srows.append(dict(ring=s["ring"], cap=f"{args.mem_cap_mib:g}",
                              lo=lo[0] if lo else "none", lp=mib(lo[1]) if lo else "",
                              hi=hi[0] if hi else "not reached", hp=mib(hi[1]) if hi else "",
                              ratio=f"{lo[0] / r1['longest'][0]:.2f}x" if lo and r1 else "",
                              probes=", ".join(f"{q['seq']}:{mib(q['peak'])}" for q in s["probes"]),
                              secs=f"{s['seconds']:.0f}"))
        print()
        print(f"Longest sequence under {args.mem_cap_mib:g} MiB per rank (peak above the pre-step RSS, "
              f"after a warm-up step; lengths in steps of 2*C*64; probes as length:peak MiB)")
        print()
        print(_common.markdown_table(srows, [("ring", "ring"), ("cap", "cap/rank (MiB)"), ("lo", "longest fitting N"),
                                             ("lp", "its peak/rank (MiB)"), ("hi", "shortest failing N"),
                                             ("hp", "its peak (MiB)"), ("ratio", "vs ring 1"),
                                             ("probes", "probes"), ("secs", "search s")]))
    if args.json:
        keep = ("procs", "impl", "ts", "sp", "spc", "t", "at", "mem", "mr", "lg", "bs")
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), model=desc, load_before=load_before, load_after=load_after,
                           malloc_pinned=_common.MALLOC_PINNED,
                           rows=[{k: v for k, v in r.items() if k not in keep} for r in rows],
                           searches=searches), f, indent=1)


if __name__ == "__main__":
    main()
