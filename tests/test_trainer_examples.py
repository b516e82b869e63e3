"""End to end: examples/trainer_long_context.py and examples/sft_long_context.py under
``accelerate launch`` (configs/accelerate/cpu_2proc.yaml: 2 CPU processes, ring 2).

A tiny Llama and a word-level tokenizer are built in code and saved to a temporary folder (no
downloads); the corpus is a local jsonl file. Each example trains 2 steps (checkpoint after each),
evaluates on held-out documents and saves the model. Checks: the launch succeeds and reports the
world, finite logged losses and eval loss, and a checkpoint that plain transformers loads and
runs in a process that never imports hf_ring_attention. (Exactness against the single-process
Trainer is tests/test_trainer.py's job; this checks the scripts, configs and launcher.)
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest

from dist_utils import free_port
from models import tiny_model
from test_trainer import HAS_TRL, _tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE_CONFIG = os.path.join(ROOT, "configs", "accelerate", "cpu_2proc.yaml")
COMMON = ["--dataset", "corpus.jsonl", "--eval_documents", "3", "--ring_size", "2", "--max_steps", "2",
          "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--save_steps", "1",
          "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--seed", "7",
          "--disable_tqdm", "true"]
EXAMPLES = {  # script, config, extra flags
    "trainer": ("trainer_long_context.py", "trainer_demo_smollm2_4k.yaml", ["--seq_len", "30"]),
    "sft": ("sft_long_context.py", "sft_demo_smollm2_4k.yaml", ["--max_length", "30"]),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_examples")
    tiny_model("llama").save_pretrained(root / "tiny")
    _tokenizer().save_pretrained(root / "tiny")
    rng = random.Random(0)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i in range(24):
            words = " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(5, 70)))
            fh.write(json.dumps({"title": f"doc{i}", "text": words}) + "\n")
    return root


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_under_accelerate_launch(example, assets):
    if example == "sft" and not HAS_TRL:
        pytest.skip("needs trl (pip install -e '.[trl]')")
    script, config, extra = EXAMPLES[example]
    out = assets / example
    env = dict(os.environ, HF_DATASETS_CACHE=str(assets / "datasets_cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
           "--main_process_port", str(free_port()), os.path.join(ROOT, "examples", script),
           "--config", os.path.join(ROOT, "configs", "train", config), "--model", str(assets / "tiny"),
           "--output_dir", str(out), *COMMON, *extra]
    proc = subprocess.run(cmd, env=env, cwd=assets, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "world 2 = dp 1 x ring 2" in proc.stdout + proc.stderr

    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), state["log_history"]
    assert math.isfinite(json.loads((out / "eval_results.json").read_text())["eval_loss"])
    # Plain transformers, without this package: an ordinary checkpoint.
    check = ("import sys, torch; from transformers import AutoModelForCausalLM; "
             f"m = AutoModelForCausalLM.from_pretrained({str(out / 'checkpoint-1')!r}); "
             "ids = torch.tensor([[5, 6, 7, 8]]); loss = m(input_ids=ids, labels=ids).loss; "
             "assert 'hf_ring_attention' not in sys.modules and torch.isfinite(loss); print(float(loss))")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=assets)
    assert run.returncode == 0, run.stderr[-3000:]
