"""Ring attention on ONE GPU: kernel-side figures (forward+backward), against SDPA.

Run (on a CUDA machine; about a minute on an H100/H200):
    python benchmarks/bench_cuda.py --seqs 16384,32768,65536 --rings 2,4,8 --out bench_cuda.json

What it measures, per global length N (B=1, --heads/--kv-heads/--head-dim, --dtype):
- SDPA: torch's scaled_dot_product_attention (is_causal, enable_gqa) forward+backward on the
  full sequence: median time and peak memory above the inputs (torch.cuda.max_memory_allocated).
- ring 1: ``ring_attention`` in this process (no process group): what the zigzag split,
  the block calls and the fp32 merges cost against one fused call.
- per-rank compute of a ring of C (no communication): every rank's real ``ring_forward`` +
  ``ring_backward`` loop, run one rank at a time, with the K/V shard of each step handed
  over in place instead of sent (dK/dV accumulators arrive as zeros). The slowest rank's
  time is the compute-bound step of a C-GPU ring; "compute speedup" = SDPA / slowest rank,
  an upper bound for a real ring, whose NCCL transfers overlap the compute but also use SMs
  and links. Balance = slowest / fastest rank. Memory = the largest per-rank peak.
- --window W adds the same per-rank figures with a sliding window (Mistral), against causal.
- --ulysses U,... adds the per-rank compute of the Ulysses x ring hybrid on U x C GPUs (C = 1 and
  every --rings size): the ring of C on the rank's Hq / U query heads (and the kv heads they use,
  ``ulysses.head_split``) over N / C tokens, plus the all-to-alls' local packing and unpacking
  (forward and backward, with the exchange replaced by a copy). The NVLink transfer itself is not
  measured; compare "sent/rank" of bench_attention.py --ulysses. Not run on a GPU yet (dry-run on CPU).
- --fp32-seq N adds an fp32 row (ring 1 on the memory-efficient kernel against SDPA).
Multi-GPU NCCL rings are measured by nothing here: that needs several GPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hf_ring_attention import ring as ring_mod
from hf_ring_attention import ring_attention, zigzag_shard
from hf_ring_attention.kernels import select_kernel
from hf_ring_attention.plan import MaskSpec
from hf_ring_attention.ulysses import UlyssesConfig, head_split, heads_to_seq, seq_to_heads

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"  # --device cpu: a dry run of this script on tiny sizes (no memory figures)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1):
    """(median seconds, peak bytes above the memory allocated before) of fn()."""
    for _ in range(warmup):
        fn()
    _sync()
    cuda = DEVICE == "cuda"
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), (torch.cuda.max_memory_allocated() - base) if cuda else 1


def inputs(n, a, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mk = lambda h: torch.randn(1, h, n, a.head_dim, device=DEVICE, dtype=dtype, generator=g)  # noqa: E731
    return mk(a.heads), mk(a.kv_heads), mk(a.kv_heads), mk(a.heads)


def fwd_bwd(attn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def run():
        q.grad = k.grad = v.grad = None
        attn(q, k, v).backward(do)
    return run


class _Solo:
    """Stands in for a process group: rank r of a ring of C, K/V shards handed over in place."""

    def __init__(self, rank, world, ks, vs):
        self.rank, self.world, self.ks, self.vs, self.created = rank, world, ks, vs, 0


class _SoloComm:
    """A ``RingOptions.comm``: the K/V of the step's source shard, handed over in place (no NCCL)."""

    def __init__(self, g: _Solo, *, tag: int, **_):
        self.g, self.kind, self.step = g, tag % 3, 0  # direction: forward K/V, backward K/V, dK/dV

    def send_recv(self, tensors, *, step=0):
        self.step += 1
        if self.kind == 2:  # dK/dV accumulators: values do not change the work
            return [torch.zeros_like(t) for t in tensors]
        src = (self.g.rank - self.step) % self.g.world
        return [self.g.ks[src], self.g.vs[src]]

    def wait(self):
        pass


def per_rank(n, world, a, dtype, window=None):
    """Each rank's (median s, peak bytes) for its forward+backward loop of a ring of `world`."""
    q, k, v, do = inputs(n, a, dtype)
    sh = lambda x, r: zigzag_shard(x, dim=2, rank=r, ring_size=world).contiguous()  # noqa: E731
    ks, vs = [sh(k, r) for r in range(world)], [sh(v, r) for r in range(world)]
    spec = MaskSpec(causal=True, window=window)
    res = []
    for r in range(world):
        qr, dor = sh(q, r), sh(do, r)
        cfg = ring_mod.RingConfig(group=_Solo(r, world, ks, vs), rank=r, ring_size=world, layout="zigzag",
                                  spec=spec, scale=a.head_dim ** -0.5, kernel=select_kernel(qr, a.kernel),
                                  options=ring_mod.RingOptions(comm=_SoloComm))

        def run(qr=qr, dor=dor, cfg=cfg, r=r):
            out, lse = ring_mod.ring_forward(qr, ks[r], vs[r], cfg)
            ring_mod.ring_backward(dor, qr, ks[r], vs[r], out, lse, cfg)
        res.append(timed(run, a.repeats))
    return res


def per_rank_hybrid(n, u, c, a, dtype):
    """The slowest rank's (s, peak bytes) of a U x C hybrid: ring compute on the head subset + a2a packing."""
    split = head_split(a.heads, a.kv_heads, u)
    sub = argparse.Namespace(**{**vars(a), "heads": split.q_local, "kv_heads": split.kv_local})
    ring = per_rank(n, c, sub, dtype)
    q, k, v, do = (x[:, :, :n // (u * c)] for x in inputs(n, a, dtype))  # one rank's piece, all heads
    ucfg = UlyssesConfig(None, u, split, all_to_all=lambda out, x, **_: out.copy_(x))  # local copy, no NCCL

    def attn(q, k, v):
        qh, kh, vh = seq_to_heads(q, k, v, ucfg)
        return heads_to_seq(qh + 0 * (kh.sum() + vh.sum()), ucfg).transpose(1, 2)  # keeps k, v in the graph
    pack = timed(fwd_bwd(attn, q, k, v, do), a.repeats)
    return max(t for t, _ in ring) + pack[0], max(m for _, m in ring) + pack[1], pack[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="16384,32768,65536")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--rings", default="2,4,8", help="ring sizes for the per-rank compute figures")
    p.add_argument("--window", type=int, default=4096, help="sliding window for the windowed rows (0: none)")
    p.add_argument("--ulysses", default="", help="Ulysses sizes U for the hybrid's per-rank compute rows (e.g. 2,4,8)")
    p.add_argument("--fp32-seq", type=int, default=16384, help="N for the fp32 row (0: none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernel", default=None, help="block kernel for the ring rows (default: auto)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device
    dtype = DTYPES[a.dtype]
    rings = [int(x) for x in a.rings.split(",") if x]
    rows = []
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    ring1 = lambda q, k, v: ring_attention(q, k, v, kernel=a.kernel)  # noqa: E731

    def row(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    def fwd_only(attn, q, k, v, do):
        def run():
            with torch.no_grad():
                attn(q, k, v)
        return run

    for n in [int(x) for x in a.seqs.split(",")]:
        t_sdpa, m_sdpa = timed(fwd_bwd(sdpa, *inputs(n, a, dtype)), a.repeats)
        f_sdpa, _ = timed(fwd_only(sdpa, *inputs(n, a, dtype)), a.repeats)
        row(n=n, dtype=a.dtype, what="SDPA", ms=t_sdpa * 1e3, fwd_ms=f_sdpa * 1e3, mem_mib=m_sdpa / 2**20)
        if DEVICE == "cuda":  # which fused kernel SDPA's default is: time each backend alone
            from torch.nn.attention import SDPBackend, sdpa_kernel
            for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel([be]):
                        tb, _ = timed(fwd_bwd(sdpa, *inputs(n, a, dtype)), a.repeats)
                        fb, _ = timed(fwd_only(sdpa, *inputs(n, a, dtype)), a.repeats)
                    row(n=n, dtype=a.dtype, what=f"SDPA {be.name}", ms=tb * 1e3, fwd_ms=fb * 1e3, vs_sdpa=t_sdpa / tb)
                except RuntimeError as e:
                    row(n=n, dtype=a.dtype, what=f"SDPA {be.name}", ms=float("nan"), error=str(e)[:200])
        t1, m1 = timed(fwd_bwd(ring1, *inputs(n, a, dtype)), a.repeats)
        f1, _ = timed(fwd_only(ring1, *inputs(n, a, dtype)), a.repeats)
        row(n=n, dtype=a.dtype, what="ring 1", ms=t1 * 1e3, fwd_ms=f1 * 1e3, vs_sdpa=t_sdpa / t1, mem_mib=m1 / 2**20,
            mem_vs_sdpa=m1 / m_sdpa)
        for c in rings:
            pr = per_rank(n, c, a, dtype)
            ts, ms = [t for t, _ in pr], [m for _, m in pr]
            row(n=n, dtype=a.dtype, what=f"ring {c} per-rank compute", ms=max(ts) * 1e3,
                compute_speedup=t_sdpa / max(ts), balance=max(ts) / min(ts), mem_mib=max(ms) / 2**20,
                mem_vs_sdpa=max(ms) / m_sdpa)
            if a.window:
                pw = per_rank(n, c, a, dtype, window=a.window)
                tw = [t for t, _ in pw]
                row(n=n, dtype=a.dtype, what=f"ring {c} per-rank compute, window {a.window}", ms=max(tw) * 1e3,
                    vs_causal=max(tw) / max(ts), balance=max(tw) / min(tw))
        for u in [int(x) for x in a.ulysses.split(",") if x]:
            for c in [1] + rings:
                t, m, pack = per_rank_hybrid(n, u, c, a, dtype)
                row(n=n, dtype=a.dtype, what=f"U {u} x C {c} per-rank compute ({u * c} GPUs)", ms=t * 1e3,
                    compute_speedup=t_sdpa / t, pack_ms=pack * 1e3, mem_mib=m / 2**20, mem_vs_sdpa=m / m_sdpa)
    if a.fp32_seq:
        n = a.fp32_seq
        t_sdpa, m_sdpa = timed(fwd_bwd(sdpa, *inputs(n, a, torch.float32)), a.repeats)
        row(n=n, dtype="fp32", what="SDPA", ms=t_sdpa * 1e3, mem_mib=m_sdpa / 2**20)
        t1, m1 = timed(fwd_bwd(ring1, *inputs(n, a, torch.float32)), a.repeats)
        row(n=n, dtype="fp32", what="ring 1 (cuda_efficient)", ms=t1 * 1e3, vs_sdpa=t_sdpa / t1,
            mem_mib=m1 / 2**20, mem_vs_sdpa=m1 / m_sdpa)

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    kname = a.kernel or "auto"
    if DEVICE == "cuda":
        from hf_ring_attention.kernels import KERNELS
        kern = select_kernel(torch.zeros(1, 1, 2, a.head_dim, device="cuda", dtype=dtype), a.kernel)
        kname = next(n for n, k in KERNELS.items() if k is kern)
    print(f"\n{name}, torch {torch.__version__}, ring kernel {kname} ({a.dtype}), B=1, {a.heads} q heads / {a.kv_heads} kv "
          f"heads, D={a.head_dim}, fwd+bwd, median of {a.repeats}\n")
    print("| N | dtype | what | fwd+bwd (ms) | fwd (ms) | vs SDPA / compute speedup | balance | peak mem (MiB) | mem vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r.get("compute_speedup", r.get("vs_sdpa"))
        extra = f"{sp:.2f}x" if sp else (f"{r['vs_causal']:.2f} of causal" if "vs_causal" in r else "")
        mem = f"{r['mem_mib']:.0f}" if "mem_mib" in r else ""
        fwd = f"{r['fwd_ms']:.1f}" if "fwd_ms" in r else ""
        print(f"| {r['n']} | {r['dtype']} | {r['what']} | {r['ms']:.1f} | {fwd} | {extra} | "
              f"{r.get('balance', float('nan')):.2f} | {mem} | {r.get('mem_vs_sdpa', float('nan')):.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, args=vars(a), rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
