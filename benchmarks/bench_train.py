"""Training step (forward + backward + AdamW step, fp32) of a Llama model over the ring, on CPU (gloo).

Run (the README's table; about 5 minutes on this 2-core machine when idle):
    python benchmarks/bench_train.py --seqs 4096,8192 --ring-sizes 1,2 --sdpa --repeats 2
Quick check (about a minute on idle cores, 2 with other jobs running):
    python benchmarks/bench_train.py --seqs 1024 --ring-sizes 1,2 --repeats 1
What the full logits cost (transformers' loss vs the package's chunked loss, in one run):
    python benchmarks/bench_train.py --seqs 4096 --ring-sizes 1,2 --repeats 1 --loss hf,chunked
The issue-10 figures (SmolLM2-135M, N = 2048, ring 1; about 10 minutes on idle cores):
    python benchmarks/bench_train.py --model demo --seqs 2048 --ring-sizes 1 --repeats 1 --loss hf,chunked \
        --loss-chunk 1024
The embedded SmolLM2-135M instead of the small model (vocab 49152: its logits dominate memory;
about 18 s per step at N=512 on one core):
    python benchmarks/bench_train.py --model demo --seqs 512 --ring-sizes 1,2 --repeats 1
Memory at length (bytes per token by part, the longest N under a cap): bench_memory.py.

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
``--loss`` picks the loss, one row per choice: ``hf`` is ``apply_ring_attention(model, groups,
loss_chunk_size=None)`` (transformers' loss, S_local x vocab logits); ``chunked`` is the package's
default path (``loss_chunk_size=--loss-chunk``: the LM head + cross-entropy ``--loss-chunk`` rows
at a time, gradients made chunk by chunk, ``hf_ring_attention/loss.py``), the same loss value.
The SDPA rows use ``install_chunked_loss`` for ``chunked``.

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

Timing on this 2-core machine: ring 2 uses both cores, the 1 x 1 baseline one; ring 4 puts 4
single-thread processes on 2 cores, so its times are oversubscribed (memory is still per rank
and meaningful). Other load on the machine slows every figure: load averages are printed.
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import gc
import itertools
import json
import time

import torch
import torch.distributed as dist

SMALL = _common.SMALL
build_model = _common.build_model


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


def _timed_ring(model, groups, loss_chunk_size):
    """Patch the model with the ring, timing its block kernels and message waits through the package's seams
    (a Kernel object and RingOptions.comm), not by replacing its functions."""
    from hf_ring_attention import RingOptions, apply_ring_attention
    from hf_ring_attention.kernels import Kernel, select_kernel

    k = select_kernel(next(model.parameters()))  # the kernel "auto" picks for this device and dtype
    apply_ring_attention(model, groups, kernel=Kernel(_timed(k.forward), _timed(k.backward)),
                         options=RingOptions(comm=_TimedComm), loss_chunk_size=loss_chunk_size)


def run_rank(rank, world, c):
    """One configuration on one rank (``world`` = ring size C). c: see main. Returns measurements."""
    from hf_ring_attention import setup_groups, shard_batch
    from hf_ring_attention.loss_patch import install_chunked_loss

    torch.manual_seed(0)
    model = build_model(c)
    groups = setup_groups(world)
    chunk = c["loss_chunk"] if c["loss"] == "chunked" else None
    if c["attn"] == "ring":
        _timed_ring(model, groups, chunk)
    elif chunk is not None:
        install_chunked_loss(model, chunk)
    n_params = sum(p.numel() for p in model.parameters())
    train_model = model
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
    p.add_argument("--loss", default="hf",
                   help="comma-separated, one row each: hf (transformers' loss, full logits), chunked (the package's)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="rows per chunk for --loss chunked")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch-mem", action="store_true", help="also count live torch allocations (profiler)")
    p.add_argument("--json", default=None, help="write all measurements to this path")
    args = p.parse_args()

    seqs = [int(x) for x in args.seqs.split(",") if x]
    rings = [int(x) for x in args.ring_sizes.split(",") if x]
    singles = [int(x) for x in args.single_threads.split(",") if x]
    losses = [x for x in args.loss.split(",") if x]
    if not losses or set(losses) - {"hf", "chunked"}:
        p.error(f"--loss {args.loss!r}: comma-separated choices among hf, chunked")
    small = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    base = dict(model=args.model, small=small, batch=args.batch, checkpointing=not args.no_checkpointing,
                grad_sync=args.grad_sync, loss_chunk=args.loss_chunk, repeats=args.repeats,
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
        for (attn, c, threads), loss in itertools.product(configs, losses):
            if n % (2 * c):
                p.error(f"--seqs {n} must be a multiple of 2 * ring size ({2 * c})")
            print(f"# N={n}, {attn}, {c} process(es) x {threads} thread(s), loss {loss} ...", flush=True)
            r = summarise(_common.spawn(run_rank, c, dict(base, seq=n, attn=attn, loss=loss),
                                        threads=threads))
            r.update(seq=n, attn=attn, ring=c, threads=threads, loss_kind=loss, tok_s=n * args.batch / r["time"],
                     logits=args.batch * (n // c if loss == "hf" else min(n // c, args.loss_chunk)) * vocab * 4)
            if attn == "ring" and c == 1 and threads == 1:
                ref.setdefault(n, r)  # the first --loss choice
            rows.append(r)
    load_after = _common.load_average()

    mib = lambda x: f"{x / 2**20:.0f}"
    for r in rows:
        b = ref.get(r["seq"])
        r["procs"] = f"{r['ring']} x {r['threads']}"
        r["impl"] = "HF SDPA" if r["attn"] == "sdpa" else "ring"
        r["lk"] = "transformers" if r["loss_kind"] == "hf" else f"chunked ({args.loss_chunk})"
        r["ts"] = f"{r['tok_s']:.0f}"
        r["sp"] = f"{b['time'] / r['time']:.2f}x" if b else ""
        r["spc"] = f"{b['cpu'] / r['cpu']:.2f}x" if b else ""
        r["t"] = f"{r['time']:.2f} ({r['fwd']:.2f} / {r['bwd']:.2f} / {r['opt']:.2f})"
        r["at"] = f"{r['attn_s']:.2f} ({r['attn_s'] / r['time']:.0%})" if r["attn_s"] else ""
        r["mem"] = mib(r["peak"]) + (f" ({mib(r['torch_peak'])})" if "torch_peak" in r else "")
        r["mr"] = f"{r['peak'] / b['peak']:.2f}" if b else ""
        r["lg"] = mib(r["logits"])
        r["bs"] = mib(r["base"])
    cols = [("seq", "N"), ("impl", "attention"), ("lk", "loss"), ("procs", "procs x threads"), ("ts", "tokens/s"),
            ("sp", "speedup vs 1x1"), ("spc", "cpu-time speedup"), ("t", "step s (fwd / bwd / opt)"),
            ("at", "attention s"),
            ("mem", "peak mem/rank (MiB)"), ("mr", "mem vs 1x1"), ("lg", "logits/rank (MiB)"),
            ("bs", "base RSS (MiB)")]
    print()
    n_params = rows[0]["params"] if rows else 0
    print(f"{desc}; {n_params / 1e6:.1f} M parameters; fp32, batch {args.batch}, AdamW, gradient checkpointing "
          f"{'off' if args.no_checkpointing else 'on'}, gradient all-reduce: "
          f"{'DDP' if args.grad_sync == 'ddp' else 'none'} (C > 1); loss: "
          f"{args.loss} (chunked: {args.loss_chunk} rows per chunk); vs 1x1: against the first --loss at 1 x 1; "
          f"median of {args.repeats} steps "
          f"(+{args.warmup} warm-up); torch {torch.__version__}; load avg before: {load_before}, after: "
          f"{load_after}; {time.time() - t_start:.0f} s in all")
    if any(c > 2 for c in rings):
        print("ring 4 runs 4 single-thread processes on this machine's 2 cores: oversubscribed, its times "
              "are not what 4 cores would give")
    print("peak mem/rank: peak RSS above the RSS right before the step (weights, AdamW state, libraries excluded: "
          "see base RSS); logits/rank: one S_local x vocab fp32 tensor (chunked loss: one chunk); attention s: time "
          "in the ring's block kernels and message waits (forward, checkpoint recompute, backward)" +
          ("; in brackets: live torch allocations" if args.torch_mem else ""))
    if rows:
        print()
        print(_common.markdown_table(rows, cols))
    if args.json:
        keep = ("procs", "impl", "lk", "ts", "sp", "spc", "t", "at", "mem", "mr", "lg", "bs")
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), model=desc, load_before=load_before, load_after=load_after,
                           malloc_pinned=_common.MALLOC_PINNED,
                           rows=[{k: v for k, v in r.items() if k not in keep} for r in rows]), f, indent=1)


if __name__ == "__main__":
    main()
