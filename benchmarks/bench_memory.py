"""Memory of a training step at length (CPU, gloo): bytes per token by part, and the longest N under a cap.

Per-token split of the demo model (SmolLM2-135M, fp32) at ring 1 and 2, both losses (about 25 minutes):
    python benchmarks/bench_memory.py --model demo --seqs 1024,2048 --rings 1,2 --losses hf,chunked
Longest N under a per-rank cap (each search: a few steps at growing lengths):
    python benchmarks/bench_memory.py --model demo --seqs "" --search-rings 1,2,4 --losses hf,chunked \
        --mem-cap-mib 1024 --search-start 1024
Llama-3-8B's shape with 2 and 4 layers, bf16 weights, and the 32-layer extrapolation (about 20 minutes):
    python benchmarks/bench_memory.py --model llama3-8b --layers 2,4 --dtype bf16 --seqs 256,512 --rings 1 \
        --losses hf,chunked --optimizer none

One training step per measurement, every rank, the package's path: ``setup_groups(C)``,
``apply_ring_attention(model, groups, loss_chunk_size=...)`` (``hf``: None, transformers' loss with
S_local x vocab fp32 logits; ``chunked``: the package default path, ``--loss-chunk`` rows at a time),
transformers' activation checkpointing (``training.enable_checkpointing``), DDP when C > 1,
``shard_batch`` of one random row of N tokens, forward, backward, optimizer step.
``--tiled-mlp T`` (a prototype, not the package): every decoder layer's MLP runs on T sequence tiles,
each checkpointed, so one tile's MLP intermediates exist at a time (DeepSpeed's TiledMLP idea).
Activation offload (transformers' ``offload=True``) needs an accelerator: n/a on CPU.

How each part is measured (per rank, ``--seqs`` gives two lengths; per local token = the change
between the two lengths divided by the change of S_local, so constant terms drop out):
- peak RSS: the process's peak resident memory above the RSS right before the step (weights,
  optimizer state and libraries are in that baseline; glibc's mmap threshold pinned, see _common.py);
  one plain step at each length after a warm-up step at the longest.
- live torch allocations: a second step under torch's profiler (memory events), each allocation
  sorted into one part when it is made. The per-token table is taken at the moment the bytes of
  everything but parameter gradients peak:
    parameter gradients: the allocations that are the parameters' .grad after backward, and any
        allocation of a parameter's size in the backward (e.g. the embedding's dense gradient);
    checkpoint stash: storages saved for backward by transformers' checkpoint of each decoder layer
        (a saved-tensors hook sees them while a decoder layer runs: its inputs, kept to the recompute);
    attention: made inside the ring's autograd Function (forward, recompute, backward);
    LM head and loss: made after the decoder's final norm in the forward, or in the backward before the
        gradient of that norm's output exists (a tensor hook marks it), or saved for backward outside
        the decoder layers;
    the rest: everything else (a layer's recomputed activations, MLP intermediates, activation
        gradients, the embedding).
- parameters, gradients, optimizer state (and DDP's gradient buckets): counted from the tensors.

Longest N under ``--mem-cap-mib`` (the per-rank peak RSS above): one warm-up step, then one step
per probed length, doubling from ``--search-start`` until a length does not fit, then bisection
(interpolated) until the bracket is within 1/``--search-resolution``; lengths are multiples of 2*C*64.
``--search-max M`` stops the doubling at M: a length that fits there ends the search with a lower bound
(e.g. ``--search-start M --search-max M``: does N = M fit?).
Ring 4 puts 4 processes on this machine's 2 cores: slow, but memory is per rank.
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import gc
import json
import time

import torch
import torch.distributed as dist

from _memory import PART_NAMES, PARTS, Accounting, attribute, mark, tile_mlp

def make_optimizer(model, kind):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-4)
    return None


def run_rank(rank, world, c):
    """One configuration on one rank (``world`` = ring size C). Returns measurements."""
    from torch.profiler import ProfilerActivity, profile

    from hf_ring_attention import apply_ring_attention, setup_groups

    torch.manual_seed(0)
    model = _common.build_model(c)
    groups = setup_groups(world)
    apply_ring_attention(model, groups, loss_chunk_size=c["loss_chunk"] if c["loss"] == "chunked" else None)
    if c["tiled"]:
        tile_mlp(model, c["tiled"])
    train = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = make_optimizer(model, c["optimizer"])
    vocab = model.config.vocab_size
    params = [p for p in model.parameters()]
    sizes = dict(params=sum(p.numel() * p.element_size() for p in params),
                 buckets=sum(p.numel() * p.element_size() for p in params) if world > 1 else 0)

    def finish():
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    def plain(n):
        gc.collect()
        shard = _common.random_shard(n, vocab, groups, c["batch"])
        if world > 1:
            dist.barrier()
        mem = _common.PeakRSS()
        mem.start()
        t0, c0 = time.perf_counter(), time.process_time()
        train(**shard).loss.backward()
        finish()
        out = dict(peak_rss=mem.peak(), wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
        if opt is not None and "opt_state" not in sizes:
            sizes["opt_state"] = sum(t.numel() * t.element_size() for s in opt.state.values()
                                     for t in s.values() if torch.is_tensor(t))
        return out

    def accounted(n):
        shard = _common.random_shard(n, vocab, groups, c["batch"])
        acc = Accounting(model)
        if world > 1:
            dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(acc.pack, lambda t: t):
                loss = train(**shard).loss
            mark("fwd_end")
            mark("bwd_start")
            loss.backward()
        acc.close()
        grads = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
        finish()
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            events = json.load(open(f.name))["traceEvents"]
        res = attribute(events, acc, grads, {q.numel() * q.element_size() for q in params})
        res["stash_hooked"] = sum(acc.stash.values())
        return res

    if c["mode"] == "split":
        plain(max(c["seqs"]))  # warm-up: imports, optimizer state, heap growth
        rows = [dict(plain(n), seq=n, s_local=n // world) for n in c["seqs"]]  # RSS before any profiling
        for r in rows:
            r["torch"] = accounted(r["seq"])
        return dict(rows=rows, sizes=sizes)
    return search(c, world, plain)


def search(c, world, plain):
    """Longest length whose per-rank peak RSS fits the cap (see the module docstring)."""
    cap, gran = c["cap_bytes"], 2 * world * 64
    up = lambda n: max(gran, -(-n // gran) * gran)  # noqa: E731
    down = lambda n: max(gran, int(n) // gran * gran)  # noqa: E731
    probes = []

    def probe(n):
        r = plain(n)
        peak = torch.tensor([r["peak_rss"]], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        probes.append(dict(seq=n, peak=float(peak), time=r["wall"]))
        return float(peak)

    n = up(c["search_start"])
    plain(n)  # warm-up
    lo = hi = None  # (length, peak) of the longest fitting / shortest failing length so far
    while True:
        p = probe(n)
        if p <= cap:
            lo = (n, p)
            if hi is not None or (c["search_max"] and n >= c["search_max"]):
                break  # bracketed, or fits at --search-max (reported as "not reached")
            n = min(2 * n, up(c["search_max"])) if c["search_max"] else 2 * n
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
        lo, hi = ((n, p), hi) if p <= cap else (lo, (n, p))
    return dict(longest=lo, shortest_failing=hi, probes=probes)


def per_token(rows):
    """Per local token of each part between the first and last length, in the phase where the last length's
    non-gradient bytes peak (the same phase at both lengths, so constant terms cancel)."""
    a, b = rows[0], rows[-1]
    ph = b["torch"]["peak_phase"]
    ds = b["s_local"] - a["s_local"]
    out = {p: (b["torch"]["phases"][ph][p] - a["torch"]["phases"][ph][p]) / ds for p in PARTS}
    out["total"] = sum(out.values())
    out["rss"] = (b["peak_rss"] - a["peak_rss"]) / ds
    out["phase"] = ph
    return out


def llama3_8b_params(layers: int) -> int:
    s = _common.LLAMA3_8B
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kv = s["num_key_value_heads"] * h // s["num_attention_heads"]
    return 2 * v * h + h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


def extrapolate(rows, args):
    """32-layer Llama-3-8B bytes per local token from the measured layer counts; N on one GPU and on eight.

    Every phase of the step (forward / backward x decoder / LM head + loss) is extrapolated on its own,
    per token and constant, linearly in the layer count, and the fitting N is the smallest over phases: at
    the short measured lengths the LM head's phase may peak, while at 32 layers and long N the backward
    through the decoder (the full stash plus one layer's recompute) can be the one that binds.
    """
    out = []
    gib = 2**30
    params = llama3_8b_params(32)
    for loss in dict.fromkeys(r["loss"] for r in rows):
        rs = sorted((r for r in rows if r["loss"] == loss and r["ring"] == 1 and not r["tiled"]), key=lambda r: r["layers"])
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        phases = {}  # phase -> (per token, of which stash, not per token) at 32 layers
        for ph in hi["rows"][-1]["torch"]["phases"]:
            fit = {}
            for r in (lo, hi):
                a, b = r["rows"][0], r["rows"][-1]
                sa, sb = a["torch"]["phases"][ph], b["torch"]["phases"][ph]
                ds = b["s_local"] - a["s_local"]
                pt = sum(sb[k] - sa[k] for k in PARTS) / ds
                fit[r["layers"]] = (pt, (sb["stash"] - sa["stash"]) / ds, sum(sb[k] for k in PARTS) - pt * b["s_local"])
            (l1, f1), (l2, f2) = (lo["layers"], fit[lo["layers"]]), (hi["layers"], fit[hi["layers"]])
            phases[ph] = tuple(x + (32 - l1) * (y - x) / (l2 - l1) for x, y in zip(f1, f2))
        for offload in (False, True):
            fits, binding = {}, {}
            for ring in (1, 8):
                # ring 1: bf16 weights + bf16 grads on the GPU, optimizer state offloaded (DeepSpeed's 1-GPU
                # recipe); ring 8: ZeRO-3 / FSDP over 8 GPUs, 16 bytes/param sharded + 2 gathered bf16 layers.
                fixed = 4 * params if ring == 1 else 16 * params / ring + 2 * 2 * (llama3_8b_params(1) - llama3_8b_params(0))
                free = (args.gpu_gib - args.reserve_gib) * gib - fixed
                per_phase = {ph: max(0, int(ring * (free - max(c, 0.0)) / (pt - (st if offload else 0))))
                             for ph, (pt, st, c) in phases.items()}
                binding[ring] = min(per_phase, key=per_phase.get)
                fits[ring] = per_phase[binding[ring]]
            ph = binding[1]
            pt, st, c = phases[ph]
            out.append(dict(loss=loss, offload="yes" if offload else "no", phase=ph, b32=pt - (st if offload else 0),
                            stash32=st, intercept=max(c, 0.0), n1=fits[1], n8=fits[8]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", choices=["small", "demo", "llama3-8b"])
    p.add_argument("--layers", default="2", help="llama3-8b: comma-separated layer counts (2,4 for the extrapolation)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights (and activations) dtype")
    p.add_argument("--seqs", default="1024,2048", help="two global lengths N for the per-token split (empty: none)")
    p.add_argument("--rings", default="1,2", help="ring sizes of the per-token split")
    p.add_argument("--losses", default="hf,chunked", help="hf (transformers' loss), chunked (the package's)")
    p.add_argument("--loss-chunk", type=int, default=4096, help="rows per chunk of the chunked loss (package default)")
    p.add_argument("--tiled-mlp", default="0", help="comma-separated tile counts of the tiled-MLP prototype (0: off)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "none"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mem-cap-mib", type=float, default=1024, help="per-rank cap of the longest-length search")
    p.add_argument("--search-rings", default="", help="ring sizes to search (empty: no search)")
    p.add_argument("--search-start", type=int, default=1024)
    p.add_argument("--search-resolution", type=float, default=16)
    p.add_argument("--search-max", type=int, default=0,
                   help="longest length probed (0: no limit); fitting there ends the search: a lower bound")
    p.add_argument("--gpu-gib", type=float, default=80, help="extrapolation: GPU memory")
    p.add_argument("--reserve-gib", type=float, default=6, help="extrapolation: CUDA context, NCCL, fragmentation")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    seqs, rings, tiles, search_rings = ints(args.seqs), ints(args.rings), ints(args.tiled_mlp), ints(args.search_rings)
    losses = [x for x in args.losses.split(",") if x]
    layers = ints(args.layers) if args.model == "llama3-8b" else [None]
    if set(losses) - {"hf", "chunked"}:
        p.error(f"--losses {args.losses}: choose among hf, chunked")
    if seqs and len(seqs) != 2:
        p.error("--seqs takes two lengths (the per-token figures are differences between them)")
    base = dict(model=args.model, small=_common.SMALL, dtype=args.dtype, attn="ring", checkpointing=True,
                loss_chunk=args.loss_chunk, optimizer=args.optimizer, batch=args.batch)
    if args.model == "demo":
        from hf_ring_attention.demo import demo_model_dir

        demo_model_dir()  # converts the GGUF once, before any rank starts
    load_before, t_start = _common.load_average(), time.time()
    rows, searches = [], []
    for nl in layers:
        for ring in rings if seqs else []:
            for loss in losses:
                for tiled in tiles:
                    print(f"# split: layers {nl}, ring {ring}, loss {loss}, tiled MLP {tiled} ...", flush=True)
                    t0 = time.time()
                    res = _common.spawn(run_rank, ring, dict(base, layers=nl, loss=loss, tiled=tiled, mode="split",
                                                             seqs=seqs))
                    pts = [per_token(r["rows"]) for r in res]
                    k = max(range(ring), key=lambda i: pts[i]["total"])  # the rank with the most per token
                    for row in res[k]["rows"]:  # the per-rank maximum of the peak RSS
                        row["peak_rss"] = max(r["rows"][res[k]["rows"].index(row)]["peak_rss"] for r in res)
                    rows.append(dict(layers=nl, ring=ring, loss=loss, tiled=tiled, rows=res[k]["rows"],
                                     sizes=res[k]["sizes"], pt=per_token(res[k]["rows"]), seconds=time.time() - t0))
        for ring in search_rings:
            for loss in losses:
                for tiled in tiles:
                    print(f"# search: ring {ring}, loss {loss}, tiled MLP {tiled}, cap {args.mem_cap_mib:g} MiB ...",
                          flush=True)
                    t0 = time.time()
                    res = _common.spawn(run_rank, ring, dict(base, layers=nl, loss=loss, tiled=tiled, mode="search",
                                                             cap_bytes=args.mem_cap_mib * 2**20,
                                                             search_start=args.search_start,
                                                             resolution=args.search_resolution,
                                                             search_max=args.search_max))[0]
                    searches.append(dict(res, layers=nl, ring=ring, loss=loss, tiled=tiled, seconds=time.time() - t0))
    report(args, rows, searches, load_before, t_start)


def report(args, rows, searches, load_before, t_start):
    kib, mib = (lambda x: f"{x / 1024:.1f}"), (lambda x: f"{x / 2**20:.0f}")
    loss_name = {"hf": "transformers", "chunked": f"chunked ({args.loss_chunk})"}
    print(f"\n{args.model}{f' ({args.dtype})' if args.model != 'demo' else ' (fp32)'}; checkpointing on; "
          f"optimizer {args.optimizer}; torch {torch.__version__}; load avg before: {load_before}, after: "
          f"{_common.load_average()}; {time.time() - t_start:.0f} s in all")
    if rows:
        ref = rows[0]["pt"]
        table = []
        for r in rows:
            pt, last = r["pt"], r["rows"][-1]
            table.append(dict(m=f"{args.model}" + (f" x{r['layers']}" if r["layers"] else ""), ring=r["ring"],
                              loss=loss_name[r["loss"]], tiled=r["tiled"] or "-",
                              **{k: kib(pt[k]) for k in PARTS + ("total", "rss")},
                              vs=f"{pt['total'] / ref['total']:.2f} / " + (f"{pt['rss'] / ref['rss']:.2f}" if ref["rss"] else "-"),
                              ph=pt["phase"], peak=f"{mib(last['peak_rss'])} ({last['torch']['total']['phase']})",
                              t=f"{last['wall']:.0f} / {last['cpu']:.0f}"))
        print(f"\nBytes per local token (KiB), per rank, between N = {args.seqs}: live torch allocations by part at the "
              "peak of everything but parameter gradients (in the phase where it peaks at the longer N); RSS: the "
              "peak-RSS slope; peak RSS with the phase of the overall torch peak")
        print(_common.markdown_table(table, [("m", "model"), ("ring", "ring"), ("loss", "loss"), ("tiled", "tiled MLP"),
                                             *[(k, PART_NAMES[k]) for k in PARTS], ("total", "total (torch)"),
                                             ("rss", "RSS"), ("vs", "vs first row (torch / RSS)"),
                                             ("ph", "peak phase (torch, no grads)"),
                                             ("peak", f"peak RSS at N={args.seqs.split(',')[-1]} MiB (phase)"),
                                             ("t", "step s wall / cpu")]))
        s = rows[0]["sizes"]
        print(f"\nNot per token (per rank): parameters {mib(s['params'])} MiB, their gradients {mib(s['params'])} MiB, "
              f"optimizer state {mib(s.get('opt_state', 0))} MiB, DDP gradient buckets (ring > 1) "
              f"{mib(s['params'])} MiB")
    if searches:
        table = []
        for s in searches:
            lo, hi = s["longest"], s["shortest_failing"]
            table.append(dict(ring=s["ring"], loss=loss_name[s["loss"]], tiled=s["tiled"] or "-", lo=lo[0] if lo else "none",
                              hi=hi[0] if hi else "not reached",
                              probes=", ".join(f"{q['seq']}:{mib(q['peak'])}" for q in s["probes"]),
                              secs=f"{s['seconds']:.0f}"))
        first = next((s["longest"][0] for s in searches if s["longest"]), None)
        for t, s in zip(table, searches):
            t["vs"] = f"{s['longest'][0] / first:.2f}x" if first and s["longest"] else ""
        print(f"\nLongest N under {args.mem_cap_mib:g} MiB per rank (peak RSS above the pre-step RSS; probes as "
              "N:peak MiB); offload: n/a on CPU")
        print(_common.markdown_table(table, [("ring", "ring"), ("loss", "loss"), ("tiled", "tiled MLP"),
                                             ("lo", "longest fitting N"), ("hi", "shortest failing N"),
                                             ("vs", "vs first row"), ("probes", "probes"), ("secs", "search s")]))
    ext = extrapolate(rows, args) if args.model == "llama3-8b" else []
    if ext:
        print(f"\nLlama-3-8B, 32 layers, extrapolated from {args.layers} layers (bf16 activations as measured here); "
              f"{args.gpu_gib:g} GiB GPU, {args.reserve_gib:g} GiB reserved; ring 1: bf16 weights + grads on the "
              "GPU, optimizer state off it; ring 8: 16 bytes/param sharded over 8 (ZeRO-3/FSDP)")
        print(_common.markdown_table([dict(e, sl=kib(e["stash32"]), b=kib(e["b32"]),
                                           c=f"{e['intercept'] / 2**30:.1f}", loss=loss_name[e["loss"]]) for e in ext],
                                     [("loss", "loss"), ("offload", "stash offloaded"), ("phase", "binding phase"),
                                      ("b", "KiB/token, 32 layers"), ("sl", "stash KiB/token"),
                                      ("c", "not per token (GiB)"), ("n1", "N on 1 GPU"), ("n8", "N on 8 GPUs, ring 8")]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows, searches=searches, extrapolation=ext), f, indent=1, default=str)


if __name__ == "__main__":
    main()
