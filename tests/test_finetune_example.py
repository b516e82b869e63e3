"""End to end: examples/finetune_long_context.py under `accelerate launch` (2 CPU processes, ring 2).

A tiny Llama and a word-level tokenizer are built in code and saved to a temporary folder
(no downloads); the corpus is a local jsonl file. One run of 4 steps (accumulation 2, rows of
30 tokens: not a multiple of 2 * ring, so shard_batch pads) checkpoints at steps 2 and 4; a
second run resumes from checkpoint-2. Checks: finite losses, checkpoints that plain
transformers loads (in a process that never imports hf_ring_attention), and a resumed run
whose step-4 weights and losses equal the uninterrupted run's (same CPU ops in the same
order, same data order and RNG state: bitwise equal expected; tolerance 1e-6 for safety).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from dist_utils import free_port
from models import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune_long_context.py")
ACCELERATE_CONFIG = os.path.join(ROOT, "configs", "accelerate", "cpu_2proc.yaml")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model_dir = root / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i in range(24):
            words = " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(5, 70)))
            fh.write(json.dumps({"title": f"doc{i}", "text": words}) + "\n")
    config = {"model": str(model_dir), "dataset": str(root / "corpus.jsonl"), "text_field": "text", "seq_len": 30,
              "ring_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4,
              "learning_rate": 1e-3, "weight_decay": 0.1, "warmup_steps": 1, "checkpoint_every": 2,
              "gradient_checkpointing": True, "precision": "no", "seed": 7, "log_every": 1}
    with open(root / "train.yaml", "w", encoding="utf-8") as fh:
        json.dump(config, fh)  # JSON is YAML
    return root


def _launch(root, *extra):
    env = dict(os.environ, HF_DATASETS_CACHE=str(root / "datasets_cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
           "--main_process_port", str(free_port()), SCRIPT, "--config", str(root / "train.yaml"), *extra]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run):
    with open(run / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_finetune_checkpoint_and_resume(assets):
    run, resumed = assets / "run", assets / "resumed"
    proc = _launch(assets, "--output-dir", str(run))
    assert "world 2 = dp 1 x ring 2" in proc.stdout + proc.stderr
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics), metrics
    for step in (2, 4):
        ckpt = run / f"checkpoint-{step}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "training_state").is_dir()
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert not (run / "checkpoint-4" / "training_state" / "model.safetensors").exists()  # no second weight copy

    # Plain transformers, without this package: the saved config is the unpatched model's.
    check = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
             f"d = {str(run / 'checkpoint-4')!r}; m = AutoModelForCausalLM.from_pretrained(d); "
             "t = AutoTokenizer.from_pretrained(d); ids = t(['w5 w6 w7 w8'], return_tensors='pt').input_ids; "
             "loss = m(input_ids=ids, labels=ids).loss; "
             "assert 'hf_ring_attention' not in sys.modules and m.config.use_cache, m.config; "
             "assert m.config._attn_implementation != 'hf_ring'; print(float(loss))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=assets)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.isfinite(torch.tensor(float(out.stdout.split()[-1])))
    initial, trained = _weights(assets / "tiny"), _weights(run / "checkpoint-4")
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "training did not change the weights"

    _launch(assets, "--output-dir", str(resumed), "--resume-from", str(run / "checkpoint-2"))
    assert [m["step"] for m in _metrics(resumed)] == [3, 4]
    for a, b in zip(metrics[2:], _metrics(resumed)):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
    again = _weights(resumed / "checkpoint-4")
    for name, w in trained.items():
        torch.testing.assert_close(again[name], w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
