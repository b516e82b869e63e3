"""Packed documents over the ring: time and balance against padding and against ignoring the mask.

Run (about 5 minutes on 2 idle cores):
    python benchmarks/bench_packed.py --seq 32768 --min-doc 1024 --max-doc 16384 --ring 2

Documents of random lengths in [--min-doc, --max-doc] (seeded) are packed into one row of
--seq tokens (the last document is cut to fit; every length a multiple of 2C). Four ways to
attend the same tokens, each forward+backward with C ranks x 1 thread:
- packed, zigzag per document (layout "zigzag_docs", what shard_batch does): exact, balanced;
- packed, global zigzag with the document mask: exact, balance depends on the mix;
- padded: every document alone in its own batch row, padded to the longest (causal): exact
  but pays for the padding;
- mask ignored: the packed row as one causal sequence: fast but WRONG (attends across
  documents): the baseline the document mask must not fall far behind.
Balance: slowest / fastest rank in CPU time, and in planned work (query-key pairs the
kernels compute, from hf_ring_attention.plan; masked tiles count their full rectangle).
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import time

import torch


def doc_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out, left = [], n
    while left > 0:
        k = min(left, int(torch.randint(lo, hi + 1, (1,), generator=g)))
        out.append(k)
        left -= k
    return out


def planned_pairs(n: int, world: int, cu, layout: str = "zigzag") -> list[int]:
    """Query-key pairs each rank's kernels compute (its whole ring), from the plan."""
    from hf_ring_attention.plan import MaskSpec, step_tasks

    spec, s, work = MaskSpec(causal=True, cu_seqlens=None if cu is None else tuple(cu)), n // world, []
    for r in range(world):
        total = 0
        for st in range(world):
            for t in step_tasks(spec, layout, r, (r - st) % world, world, s):
                rows, cols = t.q.stop - t.q.start, t.k.stop - t.k.start
                total += rows * (cols + 1) // 2 if t.kind == "causal" else rows * cols
        work.append(total)
    return work


def run(rank, world, c):
    from hf_ring_attention import ring_attention

    torch.manual_seed(rank)
    b, n = c["batch"], c["seq"]
    s = n // world

    def make():
        q = torch.randn(b, c["heads"], s, c["head_dim"]).requires_grad_()  # (B, Hq, S_local, D)
        k = torch.randn(b, c["kv_heads"], s, c["head_dim"]).requires_grad_()  # (B, Hkv, S_local, D)
        v = torch.randn(b, c["kv_heads"], s, c["head_dim"]).requires_grad_()
        return q, k, v, torch.randn(b, c["heads"], s, c["head_dim"])

    def step(q, k, v, dout):
        ring_attention(q, k, v, cu_seqlens=c["cu"], layout=c["layout"]).backward(dout)

    step(*make())  # warm-up
    wall, cpu = [], []
    for _ in range(c["repeats"]):
        inputs = make()
        torch.distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step(*inputs)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return _common.median(wall), _common.median(cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--min-doc", type=int, default=1024)
    p.add_argument("--max-doc", type=int, default=16384)
    p.add_argument("--ring", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n, world = args.seq, args.ring
    docs = [k - k % (2 * world) for k in doc_lengths(n, args.min_doc, args.max_doc, args.seed)]
    docs[-1] += n - sum(docs)  # lengths multiples of 2C, as shard_batch pads them
    cu = [0]
    for k in docs:
        cu.append(cu[-1] + k)
    longest = max(docs)
    pad_to = -(-longest // (2 * world)) * (2 * world)
    base = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, repeats=args.repeats)
    z = dict(base, layout="zigzag")
    cases = [
        ("packed, zigzag per document", dict(base, seq=n, batch=1, cu=cu, layout="zigzag_docs"),
         planned_pairs(n, world, cu, "zigzag_docs")),
        ("packed, global zigzag + document mask", dict(z, seq=n, batch=1, cu=cu), planned_pairs(n, world, cu)),
        (f"padded: {len(docs)} rows x {pad_to}", dict(z, seq=pad_to, batch=len(docs), cu=None),
         [len(docs) * w for w in planned_pairs(pad_to, world, None)]),
        ("packed, mask ignored (wrong)", dict(z, seq=n, batch=1, cu=None), planned_pairs(n, world, None)),
    ]
    load_before = _common.load_average()
    rows = []
    for name, c, work in cases:
        print(f"# {name} ...", flush=True)
        res = _common.spawn(run, world, c)
        wall, cpu = [r[0] for r in res], [r[1] for r in res]
        rows.append(dict(name=name, t=f"{max(wall):.2f}", cpu=" / ".join(f"{x:.2f}" for x in cpu),
                         bal=f"{max(cpu) / min(cpu):.2f}", work=f"{max(work) / min(work):.2f}",
                         pairs=f"{sum(work) / 1e9:.2f}", raw=max(wall)))
    ref = rows[0]["raw"]
    for r in rows:
        r["rel"] = f"{r['raw'] / ref:.2f}"
    print(f"\nN={n}, documents {docs} (cu_seqlens {cu}), ring {world} x 1 thread, "
          f"{args.heads}/{args.kv_heads} heads, D={args.head_dim}, fp32, fwd+bwd, median of {args.repeats}; "
          f"load avg before {load_before}, after {_common.load_average()}\n")
    print(_common.markdown_table(rows, [("name", "attention"), ("t", "time/rank (s)"), ("rel", "vs packed"),
                                        ("cpu", "cpu s per rank"), ("bal", "balance (cpu)"),
                                        ("work", "balance (planned pairs)"), ("pairs", "pairs computed (1e9)")]))


if __name__ == "__main__":
    main()
