"""Shared helpers for the benchmarks: spawn CPU ranks, measure peak memory, build models, summarise.

``spawn(fn, world_size, *args, threads=1)`` starts ``world_size`` processes (torch
multiprocessing, "spawn"), gives each ``threads`` intra-op threads, initialises a gloo
process group on a free port, calls ``fn(rank, world_size, *args)`` and returns the
per-rank results (picklable values) in rank order; an exception in any rank is raised
in the parent with that rank's traceback.

Peak memory (``PeakRSS``): resident set size, not torch's accounting, so it also sees
kernel scratch buffers, gloo buffers and anything else the process touches. Two things
make RSS honest on glibc (measured, see /work/shared/DESIGN.md "Facts measured"):
- glibc raises its mmap threshold dynamically after a large free, after which freed
  blocks stay resident in the heap; small (sharded) tensors then look bigger than large
  (unsharded) ones. ``pin_malloc()`` fixes the threshold (M_MMAP_THRESHOLD = 64 KiB),
  so every tensor above 64 KiB is its own mmap and goes back to the OS when freed.
  This module calls it on import; import it before torch allocates anything.
- the high-water mark is reset with ``echo 5 > /proc/self/clear_refs`` and read from
  VmHWM in /proc/self/status; peaks are counted from the RSS right before the measured
  work (``PeakRSS.start()``).
``torch_peak_bytes(fn)`` counts live torch CPU allocations instead (torch profiler's
memory events): it misses non-torch memory but is immune to allocator caching.

``build_model(c)`` builds the training benchmarks' models (bench_train.py, bench_memory.py):
``small`` (a Llama built in code), ``demo`` (SmolLM2-135M) or ``llama3-8b`` (Llama-3-8B's
shape with ``layers`` layers, random weights).
"""

from __future__ import annotations

import ctypes
import os
import queue as queue_mod
import socket
import statistics
import time
import traceback
from datetime import timedelta

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h); setting it disables the dynamic threshold
MMAP_THRESHOLD_BYTES = 64 * 1024


def pin_malloc(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold (see module docstring). Returns False where not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except OSError:
        return False


MALLOC_PINNED = pin_malloc()  # at import: before torch allocates in this process


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


class PeakRSS:
    """Peak resident memory of this process above a baseline.

    ``start()`` records the current RSS and resets the high-water mark; ``peak()`` returns
    VmHWM - baseline in bytes (the highest RSS reached since ``start()``).
    """

    def start(self) -> None:
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        self.base = rss_bytes()

    def peak(self) -> int:
        return _status_kib("VmHWM") * 1024 - self.base


def torch_peak_bytes(fn) -> int:
    """Peak of live torch CPU allocations made while ``fn()`` runs (torch profiler memory events).

    Read from the profiler's per-allocation "[memory]" events (their running "Total
    Allocated"), so allocations made and freed inside one kernel count too. Tensors that
    exist before ``fn`` runs are not counted.
    """
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)  # the only public view of every allocation event
        events = [e for e in json.load(open(f.name))["traceEvents"]
                  if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    events = [e["args"] for e in sorted(events, key=lambda e: e["ts"])]  # the file is not in time order
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)
# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json): all but the layer count.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def build_model(c: dict):
    """The training model of configuration ``c``, in training mode, the same weights on every rank.

    Keys: ``model`` ("small": ``c["small"]``'s Llama config; "demo": SmolLM2-135M; "llama3-8b":
    Llama-3-8B's shape with ``c["layers"]`` layers), ``attn`` ("ring" or "sdpa"), ``checkpointing``
    (transformers' activation checkpointing, non-reentrant), optional ``dtype`` ("fp32"/"bf16" weights).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, DTYPES[c.get("dtype", "fp32")])
    attn = "sdpa" if c["attn"] == "sdpa" else "eager"  # eager is only a placeholder: the ring replaces it
    if c["model"] == "demo":
        from hf_ring_attention.demo import demo_model_dir

        model = LlamaForCausalLM.from_pretrained(demo_model_dir(), dtype=dtype, attn_implementation=attn)
    else:
        shape = dict(c["small"]) if c["model"] == "small" else dict(LLAMA3_8B, num_hidden_layers=c["layers"])
        torch.manual_seed(0)
        cfg = LlamaConfig(**shape, max_position_embeddings=1 << 20, tie_word_embeddings=False,
                          attention_dropout=0.0, use_cache=False, attn_implementation=attn)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)  # built in dtype: no fp32 copy of 8B-wide weights
    model.config.use_cache = False
    model.train()
    if c["checkpointing"]:
        from hf_ring_attention.training import enable_checkpointing

        enable_checkpointing(model, offload=c.get("offload", False))
    return model


def random_shard(n: int, vocab: int, groups, batch: int = 1) -> dict:
    """``shard_batch`` of ``batch`` random rows of ``n`` tokens (labels = ids), the same rows on every rank."""
    import torch

    from hf_ring_attention import shard_batch

    g = torch.Generator().manual_seed(1234 + n)
    ids = torch.randint(0, vocab, (batch, n), generator=g)
    return shard_batch({"input_ids": ids, "labels": ids}, groups)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, threads, fn, args, results):
    pin_malloc()  # already done at import; repeated in case fn's module imported torch first
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=600))
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, *args, threads: int = 1, timeout: float = 3600) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks with ``threads`` threads each.

    ``fn`` must be importable (defined at module level). Returns the results in rank order.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message), died, or the run
            took longer than ``timeout`` seconds (every rank is killed then).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size and not errors:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]}; "
                                  "out of memory?)")
                elif time.monotonic() > deadline:
                    errors.append(f"ranks {sorted(set(range(world_size)) - set(done))} did not finish "
                                  f"within {timeout}s")
                continue
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            else:
                done[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [done[r] for r in range(world_size)]


def median(xs) -> float:
    return statistics.median(xs)


def load_average() -> str:
    """The 1/5/15-minute load averages (other processes on the machine disturb timings)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows of dicts -> a markdown table; columns are (key, header) pairs, values printed as given."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)
