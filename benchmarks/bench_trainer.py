"""Throughput of RingTrainer (transformers' Trainer) against the package's own loop, same step.

Run (ring 2 on 2 CPU processes, N = 4096; about 2 minutes on idle cores)::

    flock -x /tmp/hra-cpu.lock python benchmarks/bench_trainer.py --seq 4096 --steps 6 --rounds 2

Both paths train the same model on the same rows, one row of N tokens per optimizer step
(dp 1 x ring 2), fp32, AdamW, gradient clipping at 1.0, a linear lr schedule, transformers'
activation checkpointing, DDP without the unused-parameter search:
- loop: ``make_accelerator`` + ``make_dataloader`` + ``training_step`` (hf_ring_attention.training);
- trainer: ``RingTrainer.train()`` (TrainingArguments with the same settings, logging off).
A step is the time between consecutive step ends on each rank (so data loading, sharding, the
loss-divisor all-reduce, forward, backward, gradient all-reduce, clipping and the optimizer are
all in it); the first ``--warmup`` steps of a run are dropped. tokens/s = N / the slowest rank's
median step; CPU s = the mean over ranks of the process CPU time per step. The paths alternate
(loop, trainer, loop, trainer, ...) for ``--rounds`` rounds, so slow drifts of the machine's
load hit both; the figure is the median over all measured steps of each path.

Model (as benchmarks/bench_train.py's default): LlamaForCausalLM built in code, hidden 256,
4 layers, 8 / 2 heads, vocab 4096 (4.9 M parameters): attention dominates from N ~ 4k.
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)
LR = 1e-4


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL, max_position_embeddings=1 << 20, tie_word_embeddings=False, attention_dropout=0.0,
                      use_cache=False, attn_implementation="eager")  # eager: a placeholder, the ring replaces it
    model = LlamaForCausalLM(cfg)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def rows(n_rows: int, seq: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, SMALL["vocab_size"], (n_rows, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")


class Clock:
    """Wall and process-CPU times at every step end."""

    def __init__(self):
        self.marks = []

    def mark(self):
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self, warmup: int) -> list[tuple[float, float]]:
        m = self.marks
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(m, m[1:])][warmup:]


def run_loop(c, ring) -> list[tuple[float, float]]:
    from accelerate.state import AcceleratorState, GradientState
    from transformers import get_scheduler

    import hf_ring_attention as hra
    from hf_ring_attention.training import batch_stream, make_accelerator, make_dataloader, training_step

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = make_accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    groups = hra.setup_groups(ring)
    model = hra.apply_ring_attention(build_model(), groups)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    total = c["warmup"] + c["steps"] + 1
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batches = batch_stream(make_dataloader(rows(total, c["seq"]), groups, batch_size=1, device=accelerator.device))
    clock = Clock()
    dist.barrier()
    clock.mark()
    for _ in range(total):
        training_step(accelerator, model, optimizer, scheduler, [next(batches)], groups, max_grad_norm=1.0)
        clock.mark()
    return clock.steps(c["warmup"] + 1)  # the first interval also holds the first batch's worker start


def run_trainer(c, ring) -> list[tuple[float, float]]:
    from transformers import TrainerCallback, TrainingArguments

    import hf_ring_attention as hra

    clock = Clock()

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            dist.barrier()
            clock.mark()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    total = c["warmup"] + c["steps"] + 1
    args = TrainingArguments(tempfile.mkdtemp(), max_steps=total, per_device_train_batch_size=1, learning_rate=LR,
                             optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear",
                             use_cpu=True, report_to="none", logging_strategy="no", save_strategy="no",
                             disable_tqdm=True, ddp_find_unused_parameters=False, seed=0)
    trainer = hra.RingTrainer(model=build_model(), args=args, train_dataset=rows(total, c["seq"]), ring_size=ring,
                              callbacks=[Marks()])
    trainer.train()
    return clock.steps(c["warmup"] + 1)


def run_rank(rank, world, c):
    out = {"loop": [], "trainer": []}
    for _ in range(c["rounds"]):
        out["loop"] += run_loop(c, world)
        out["trainer"] += run_trainer(c, world)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="tokens per row (N)")
    parser.add_argument("--ring", type=int, default=2, help="processes (one ring)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="dropped steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="alternations loop / trainer")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--json", help="write the raw per-step times here")
    c = vars(parser.parse_args())
    print(f"load average before: {_common.load_average()}")
    ranks = _common.spawn(run_rank, c["ring"], c, threads=c["threads"])
    print(f"load average after: {_common.load_average()}")
    rows_, summary = [], {}
    for path in ("loop", "trainer"):
        per_rank = [[w for w, _ in r[path]] for r in ranks]
        wall = max(statistics.median(w) for w in per_rank)  # the slowest rank sets the pace
        cpu = statistics.mean(statistics.median([cc for _, cc in r[path]]) for r in ranks)
        summary[path] = dict(wall=wall, cpu=cpu)
        rows_.append({"path": path, "steps": len(per_rank[0]), "step_s": f"{wall:.3f}",
                      "tok_s": f"{c['seq'] / wall:.0f}", "cpu_s": f"{cpu:.3f}"})
    for r, path in zip(rows_[1:], ("trainer",)):
        r["overhead_wall"] = f"{summary[path]['wall'] / summary['loop']['wall'] - 1:+.1%}"
        r["overhead_cpu"] = f"{summary[path]['cpu'] / summary['loop']['cpu'] - 1:+.1%}"
    rows_[0].update(overhead_wall="", overhead_cpu="")
    print(f"N={c['seq']}, ring {c['ring']}, {c['threads']} thread(s) per process")
    print(_common.markdown_table(rows_, [("path", "path"), ("steps", "steps"), ("step_s", "step s (wall)"),
                                         ("tok_s", "tokens/s"), ("cpu_s", "CPU s/step/rank"),
                                         ("overhead_wall", "overhead (wall)"), ("overhead_cpu", "overhead (CPU)")]))
    if c["json"]:
        with open(c["json"], "w", encoding="utf-8") as fh:
            json.dump({"config": c, "ranks": ranks}, fh)


if __name__ == "__main__":
    main()
