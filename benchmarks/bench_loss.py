"""The LM head + cross-entropy alone (forward + backward): transformers' loss vs chunked designs.

Run (about a minute on this 2-core machine; SmolLM2-135M's head: hidden 576, vocab 49152):
    python benchmarks/bench_loss.py --rows 2048 --hidden 576 --vocab 49152 --chunks 4096,1024,512,256

For ``--rows`` hidden states (fp32, requiring grad) and a (vocab, hidden) weight, each design
computes sum(CE(h W^T, y)) / rows and its backward (dh, dW), ``--repeats`` times:
- hf: ``ForCausalLMLoss(h @ W^T, ...)``, transformers' own loss: the (rows, vocab) fp32 logits,
  the log-softmax it keeps and their gradients are alive together;
- checkpoint: each chunk of rows under ``torch.utils.checkpoint`` (non-reentrant): its logits are
  recomputed in backward (4 vocab-sized matmuls instead of 3);
- fused: ``hf_ring_attention.chunked_causal_lm_loss`` (the package's torch path): each chunk's
  gradients are made in the forward pass, in place in its one logits buffer.
Reported: median wall and CPU seconds per forward + backward, and the peak of live torch
allocations above the inputs (torch profiler; see benchmarks/_common.py), with the relative
error of the loss and of dW against hf. One process, ``--threads`` threads.
"""

import _common  # noqa: F401  (first: pins glibc's mmap threshold)

import argparse
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_ring_attention import chunked_causal_lm_loss


def _hf(h, w, y, chunk):
    return ForCausalLMLoss(h @ w.t(), None, w.shape[0], shift_labels=y)


def _chunk_sum(h, w, y):
    return torch.nn.functional.cross_entropy((h @ w.t()).float(), y, reduction="sum")


def _checkpoint(h, w, y, chunk):
    total = sum(checkpoint(_chunk_sum, h[i:i + chunk], w, y[i:i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / (y != -100).sum()


def _fused(h, w, y, chunk):
    return chunked_causal_lm_loss(h, w, y, chunk_size=chunk, impl="torch")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunks", default="4096,1024,512,256", help="comma-separated rows per chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(args.rows, args.hidden, generator=g)).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5).requires_grad_()
    y = torch.randint(0, args.vocab, (args.rows,), generator=g)

    def run(fn, chunk):
        h.grad = w.grad = None
        loss = fn(h, w, y, chunk)
        loss.backward()
        return loss.detach(), w.grad.clone()

    ref_loss, ref_dw = run(_hf, None)
    rows = []
    for name, fn, chunks in (("hf", _hf, [None]), ("checkpoint", _checkpoint, None), ("fused", _fused, None)):
        for chunk in chunks or [int(c) for c in args.chunks.split(",")]:
            run(fn, chunk)  # warm-up
            walls, cpus = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                loss, dw = run(fn, chunk)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            h.grad = w.grad = None
            peak = _common.torch_peak_bytes(lambda: fn(h, w, y, chunk).backward())
            rows.append(dict(design=name, chunk=chunk or "-", wall=f"{statistics.median(walls):.2f}",
                             cpu=f"{statistics.median(cpus):.2f}", peak=f"{peak / 2**20:.0f}",
                             lerr=f"{abs(loss - ref_loss).item() / ref_loss.item():.1e}",
                             werr=f"{((dw - ref_dw).norm() / ref_dw.norm()).item():.1e}"))
    logits = args.rows * args.vocab * 4 / 2**20
    print(f"rows {args.rows}, hidden {args.hidden}, vocab {args.vocab} (one rows x vocab fp32 tensor: "
          f"{logits:.0f} MiB; dW: {args.vocab * args.hidden * 4 / 2**20:.0f} MiB), {args.threads} thread(s), "
          f"median of {args.repeats}; torch {torch.__version__}; load avg {_common.load_average()}")
    print(_common.markdown_table(rows, [("design", "design"), ("chunk", "chunk rows"), ("wall", "fwd+bwd s"),
                                        ("cpu", "CPU s"), ("peak", "peak torch MiB"), ("lerr", "loss rel err"),
                                        ("werr", "dW rel err")]))


if __name__ == "__main__":
    main()
