"""Ring attention forward+backward against single-process SDPA on CPU (gloo).

Run (the issue's target; about 2.5 minutes on 2 idle cores):
    python benchmarks/bench_attention.py --seq 16384 --heads 8 --kv-heads 2 --head-dim 64 \
        --ring-sizes 2 --layouts zigzag,contiguous --repeats 3
Sliding window N/8 at ring 2 and 4, with the causal runs it is compared to (about 7 minutes;
ring 4 on 2 cores oversubscribes them; the windowed SDPA baseline holds an (N, N) fp32 mask):
    python benchmarks/bench_attention.py --seq 16384 --heads 8 --kv-heads 2 --head-dim 64 \
        --ring-sizes 2,4 --layouts zigzag,contiguous --sliding-window N/8 --repeats 3
Quick check (seconds):
    python benchmarks/bench_attention.py --seq 2048 --ring-sizes 1,2 --repeats 2
Ulysses (all-to-all) x ring at equal process counts P (every U x C = P with U dividing the heads;
U = 1 is the ring, C = 1 pure Ulysses); 4 processes oversubscribe 2 cores (bytes and memory only):
    python benchmarks/bench_attention.py --seq 16384 --ring-sizes 2 --ulysses --repeats 3
    python benchmarks/bench_attention.py --seq 16384 --ring-sizes 4 --ulysses --repeats 1

Every configuration runs in fresh processes: C ranks with --threads threads each, against
one process with the same --threads running torch's SDPA on the full sequence (is_causal,
enable_gqa; with --sliding-window, an explicit (N, N) bool mask, built before the memory
baseline so not counted, but SDPA's own fp32 copy of it is). Ring size 1 = ring_attention in
one process (runs one layout only). Reported per configuration:
- time/rank: the slowest rank's median wall time of one forward+backward (ranks start
  each repeat together, after a barrier);
- speedup: the baseline's median over that; cpu-time speedup: the same with the CPU time
  of the busiest rank (less disturbed by other load on the machine, blind to waiting);
- peak mem/rank: the largest per-rank peak RSS above the RSS right before the inputs
  are created (after one warm-up step; glibc's mmap threshold pinned, see _common.py).
  It counts q, k, v, dout, out and all gradients as well as every temporary;
- working mem/rank: the largest per-rank peak RSS above the RSS once q, k, v and dout exist
  (attention's own memory: out, lse, gradients, received blocks, kernel scratch);
- balance: slowest rank's median / fastest rank's median, in wall time (ranks wait for
  each other, so this stays near 1) and in CPU time (the work each rank actually did);
- steps with work: ring steps (summed over ranks) whose plan computes any block;
- vs causal: wall time (and busiest rank's CPU time) against the causal ring of the same
  size and layout (sliding window);
- sent/rank (--ulysses): bytes one rank sends to others in one forward+backward (the largest over
  ranks): ring K/V, dK/dV (through a counting ``RingOptions.comm``) and all-to-all payloads bound for
  other ranks (``RingOptions.all_to_all``); the per-forward agreement's few bytes are not counted.
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import gc
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SENT = [0]  # bytes this process sent to other ranks (one process per rank)


def _counting_comm(group, **kw):
    from hf_ring_attention.comm import RingComm

    class Counting(RingComm):
        def send_recv(self, tensors, *, step=0):
            SENT[0] += sum(t.numel() * t.element_size() for t in tensors)
            return super().send_recv(tensors, step=step)
    return Counting(group, **kw)


def _counting_all_to_all(out, x, *, group, timeout):
    from hf_ring_attention.ulysses import _all_to_all

    u = dist.get_world_size(group)
    SENT[0] += x.numel() * x.element_size() * (u - 1) // u  # the rank's own piece stays local
    _all_to_all(out, x, group=group, timeout=timeout)


def run_case(rank, world, c):
    """One configuration on one rank; c is a dict (see main). Returns this rank's measurements."""
    from hf_ring_attention import RingOptions, ring_attention, setup_groups, ulysses_attention

    dtype, s = DTYPES[c["dtype"]], c["seq"] // world
    b, hq, hkv, d = c["batch"], c["heads"], c["kv_heads"], c["head_dim"]
    rows = {k: c[k] for k in ("bwd_q_rows", "bwd_kv_rows") if c.get(k)}
    if c["kind"] == "ulysses":  # world = U x C; U = 1 runs the plain ring through the same call
        groups = setup_groups(world // c["ulysses"], ulysses_size=c["ulysses"])
        rows.update(comm=_counting_comm, all_to_all=_counting_all_to_all)
    options = RingOptions(**rows) if rows else None
    mask = None
    if c["kind"] == "sdpa" and c["window"]:
        i = torch.arange(c["seq"])
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - c["window"])  # (N, N) True = attend

    def make():
        g = torch.Generator().manual_seed(1000 + rank)
        q = torch.randn(b, hq, s, d, generator=g, dtype=dtype).requires_grad_()  # (B, Hq, S_local, D)
        k = torch.randn(b, hkv, s, d, generator=g, dtype=dtype).requires_grad_()  # (B, Hkv, S_local, D)
        v = torch.randn(b, hkv, s, d, generator=g, dtype=dtype).requires_grad_()
        dout = torch.randn(b, hq, s, d, generator=g, dtype=dtype)
        return q, k, v, dout

    def forward(q, k, v):
        if c["kind"] == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        if c["kind"] == "ulysses":
            return ulysses_attention(q, k, v, groups, layout=c["layout"], sliding_window=c["window"] or None,
                                     options=options)
        return ring_attention(q, k, v, layout=c["layout"], sliding_window=c["window"] or None, options=options)

    def step(q, k, v, dout):
        q.grad = k.grad = v.grad = None
        out = forward(q, k, v)
        t_fwd = time.perf_counter()
        out.backward(dout)
        return t_fwd

    for _ in range(c["warmup"]):  # the first backward imports modules and grows the heap: not measured
        step(*make())
    gc.collect()

    mem = _common.PeakRSS()
    mem.start()
    q, k, v, dout = make()
    inputs_rss = _common.rss_bytes()  # q, k, v, dout resident: the working memory is counted above this
    wall, cpu, fwd = [], [], []
    SENT[0] = 0
    for _ in range(c["repeats"]):
        if world > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        t_fwd = step(q, k, v, dout)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        fwd.append(t_fwd - t0)
    res = dict(wall=wall, cpu=cpu, fwd=fwd, peak_rss=mem.peak(), base_rss=mem.base,
               work_rss=mem.peak() + mem.base - inputs_rss, sent=SENT[0] / c["repeats"])
    del q, k, v, dout
    if c["torch_mem"]:
        if world > 1:
            dist.barrier()
        res["torch_peak"] = _common.torch_peak_bytes(lambda: step(*make()))
    return res


def steps_with_work(seq, world, layout, window):
    """(ring steps with any block to compute, all ring steps), summed over the ranks."""
    from hf_ring_attention.plan import MaskSpec, step_tasks

    spec, s = MaskSpec(causal=True, window=window or None), seq // world
    busy = sum(bool(step_tasks(spec, layout, r, (r - st) % world, world, s))
               for r in range(world) for st in range(world))
    return busy, world * world


def summarise(per_rank):
    med = lambda key: [_common.median(r[key]) for r in per_rank]
    wall, cpu = med("wall"), med("cpu")
    out = dict(time=max(wall), cpu=max(cpu), fwd=max(med("fwd")), wall_per_rank=wall, cpu_per_rank=cpu,
               wall_all=[r["wall"] for r in per_rank], cpu_all=[r["cpu"] for r in per_rank],
               balance_wall=max(wall) / min(wall), balance_cpu=max(cpu) / min(cpu),
               peak=max(r["peak_rss"] for r in per_rank), peak_per_rank=[r["peak_rss"] for r in per_rank],
               work=max(r["work_rss"] for r in per_rank), work_per_rank=[r["work_rss"] for r in per_rank],
               sent=max(r["sent"] for r in per_rank))
    if "torch_peak" in per_rank[0]:
        out["torch_peak"] = max(r["torch_peak"] for r in per_rank)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=16384, help="global sequence length N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--ring-sizes", default="2", help="comma-separated ring sizes; 1 = ring_attention in one process")
    p.add_argument("--layouts", default="zigzag,contiguous")
    p.add_argument("--sliding-window", default=None, help="window W (int or N/k); runs causal and windowed")
    p.add_argument("--ulysses", action="store_true",
                   help="--ring-sizes are process counts P: run every Ulysses x ring split U x C = P (first layout)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (baseline too)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bwd-q-rows", type=int, default=None,
                   help="RingOptions.bwd_q_rows: query rows per backward kernel call (default: the package's)")
    p.add_argument("--bwd-kv-rows", type=int, default=None,
                   help="RingOptions.bwd_kv_rows: key rows per backward kernel call (default: the package's)")
    p.add_argument("--torch-mem", action="store_true", help="also count live torch allocations (profiler)")
    p.add_argument("--no-baseline", action="store_true", help="skip the single-process SDPA runs")
    p.add_argument("--json", default=None, help="write all measurements to this path")
    args = p.parse_args()

    n = args.seq
    window = None
    if args.sliding_window:
        w = args.sliding_window.replace(" ", "")
        window = n // int(w[2:]) if w.upper().startswith("N/") else int(w)
    rings = [int(x) for x in args.ring_sizes.split(",")]
    layouts = args.layouts.split(",")
    if bad := [x for x in layouts if x not in ("zigzag", "contiguous")]:
        p.error(f"--layouts {bad}: choose from zigzag, contiguous (zigzag_docs needs documents: bench_packed.py)")
    for c in rings:
        if n % (2 * c):
            p.error(f"--seq {n} must be a multiple of 2 * ring size ({2 * c})")
    # (processes, U): --ulysses runs every split of each process count, U dividing the heads
    splits = [(c, u) for c in rings for u in range(c, 0, -1) if c % u == 0 and args.heads % u == 0] \
        if args.ulysses else [(c, 0) for c in rings]
    base = dict(seq=n, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, torch_mem=args.torch_mem,
                bwd_q_rows=args.bwd_q_rows, bwd_kv_rows=args.bwd_kv_rows)
    load_before = _common.load_average()
    t_start = time.time()
    rows, baseline, causal_time = [], {}, {}
    for win in [None] + ([window] if window else []):
        attn = "causal" if win is None else f"window {win}"
        if not args.no_baseline:
            print(f"# sdpa, {attn}, 1 process x {args.threads} threads ...", flush=True)
            r = summarise(_common.spawn(run_case, 1, dict(base, kind="sdpa", layout="-", window=win),
                                        threads=args.threads))
            baseline[win] = r
            rows.append(dict(attention=attn, impl="SDPA", layout="-", ring=1, **r))
        for c, u in splits:
            for layout in layouts[:1] if c == 1 or u else layouts:  # one process: the layout changes nothing
                what = f"ring {c}" if not u else f"U {u} x C {c // u}"
                print(f"# {what}, {layout}, {attn}, {c} x {args.threads} threads ...", flush=True)
                kind = dict(kind="ulysses", ulysses=u) if u else dict(kind="ring")
                r = summarise(_common.spawn(run_case, c, dict(base, layout=layout, window=win, **kind),
                                            threads=args.threads))
                r["steps"] = steps_with_work(n, c // max(u, 1), layout, win)
                if win is None:
                    causal_time[c, layout] = r["time"], r["cpu"]
                elif (c, layout) in causal_time:
                    r["vs_causal"] = r["time"] / causal_time[c, layout][0]
                    r["vs_causal_cpu"] = r["cpu"] / causal_time[c, layout][1]
                if win in baseline:
                    r["speedup"] = baseline[win]["time"] / r["time"]
                    r["speedup_cpu"] = baseline[win]["cpu"] / r["cpu"]
                    r["mem_ratio"] = r["peak"] / baseline[win]["peak"]
                    r["work_ratio"] = r["work"] / baseline[win]["work"]
                impl = "ring" if u in (0, 1) else "Ulysses" if u == c else "hybrid"
                split = f"{u} x {c // u}" if u else f"1 x {c}"
                rows.append(dict(attention=attn, impl=impl, layout=layout if c > 1 else "-", ring=c, split=split, **r))
    load_after = _common.load_average()

    mib = lambda x: f"{x / 2**20:.0f}"
    for r in rows:
        r["t"] = f"{r['time']:.3f}"
        r["sp"] = f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x" if r["impl"] == "SDPA" else ""
        r["spc"] = f"{r['speedup_cpu']:.2f}x" if "speedup_cpu" in r else "1.00x" if r["impl"] == "SDPA" else ""
        r["mem"] = mib(r["peak"]) + (f" ({mib(r['torch_peak'])})" if "torch_peak" in r else "")
        r["mr"] = f"{r['mem_ratio']:.2f}" if "mem_ratio" in r else "1.00" if r["impl"] == "SDPA" else ""
        r["wm"] = mib(r["work"])
        r["wr"] = f"{r['work_ratio']:.2f}" if "work_ratio" in r else "1.00" if r["impl"] == "SDPA" else ""
        r["bal"] = f"{r['balance_wall']:.2f} / {r['balance_cpu']:.2f}"
        r["st"] = f"{r['steps'][0]}/{r['steps'][1]}" if "steps" in r else ""
        r["vc"] = f"{r['vs_causal']:.2f} / {r['vs_causal_cpu']:.2f}" if "vs_causal" in r else ""
        r["sb"] = f"{r['sent'] / 2**20:.1f}" if r.get("sent") else "0" if "sent" in r else ""
    cols = [("attention", "attention"), ("impl", "impl"), ("layout", "layout"), ("ring", "procs"),
            ("t", "time/rank (s)"), ("sp", "speedup"), ("spc", "cpu-time speedup"), ("mem", "peak mem/rank (MiB)"),
            ("mr", "mem vs SDPA"), ("wm", "working mem/rank (MiB)"), ("wr", "working vs SDPA"),
            ("bal", "balance wall / cpu"), ("st", "steps with work"),
            ("vc", "vs causal wall / cpu")]
    if args.ulysses:
        cols[3:4] = [("ring", "procs"), ("split", "U x C")]
        cols.append(("sb", "sent/rank (MiB)"))
    print()
    print(f"N={n}, B={args.batch}, {args.heads} q heads / {args.kv_heads} kv heads, D={args.head_dim}, "
          f"{args.dtype}, fwd+bwd, {args.threads} thread(s) per process, median of {args.repeats} "
          f"(+{args.warmup} warm-up), torch {torch.__version__}; load avg before: {load_before}, after: "
          f"{load_after}; {time.time() - t_start:.0f} s in all")
    mem_note = ("peak mem: peak RSS above the pre-input RSS, q/k/v/dout/out/grads included; working mem: "
                "peak RSS above the RSS once q/k/v/dout exist (out, grads and every temporary)")
    print(f"memory: {mem_note}" + ("; (in brackets: live torch allocations)" if args.torch_mem else ""))
    print()
    print(_common.markdown_table(rows, cols))
    if args.json:
        shown = [k for k, _ in cols[4:] if k != "split"]  # formatted copies of the numbers below
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), window=window, load_before=load_before, load_after=load_after,
                           memory=mem_note, malloc_pinned=_common.MALLOC_PINNED,
                           rows=[{k: v for k, v in r.items() if k not in shown} for r in rows]), f, indent=1)


if __name__ == "__main__":
    main()
