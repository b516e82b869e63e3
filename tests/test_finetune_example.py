"""End to end: examples/finetune_long_context.py under `accelerate launch` (2 CPU processes, ring 2).

A tiny Llama and a word-level tokenizer are built in code and saved to a temporary folder
(no downloads); the corpus is a local jsonl file. One run of 4 steps (accumulation 2, rows of
30 tokens: not a multiple of 2 * ring, so shard_batch pads) checkpoints at steps 2 and 4 (the
module fixture; the tests below work on copies of it). Checks: finite losses, checkpoints that
plain transformers loads (in a process that never imports hf_ring_attention), and a run resumed
from checkpoint-2 into the same folder whose step-4 weights and losses equal the uninterrupted
run's (same CPU ops in the same order, same data order and RNG state: bitwise equal expected;
tolerance 1e-6 for safety). Run-folder hygiene: a rerun into a non-empty output_dir fails on
both ranks before any work, ``--overwrite-output-dir true`` starts a clean history, and an
incomplete checkpoint is refused by name (checked in-process: the check reads only files).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
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


def _launch(root, *extra, expect_ok=True):
    env = dict(os.environ, HF_DATASETS_CACHE=str(root / "datasets_cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
           "--main_process_port", str(free_port()), SCRIPT, "--config", str(root / "train.yaml"), *extra]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run):
    with open(run / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _example():
    """The example as a module (its checks read only files: no launcher needed)."""
    spec = importlib.util.spec_from_file_location("finetune_long_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(assets):
    """The uninterrupted run: 4 steps, checkpoint-2 and checkpoint-4 (read-only for the tests)."""
    run = assets / "run"
    proc = _launch(assets, "--output-dir", str(run))
    assert "world 2 = dp 1 x ring 2" in proc.stdout + proc.stderr
    return run


def test_finetune_checkpoints(assets, trained):
    metrics = _metrics(trained)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics), metrics
    for step in (2, 4):
        ckpt = trained / f"checkpoint-{step}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "training_state").is_dir()
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
        assert (ckpt / "training_state" / "random_states_1.pkl").is_file()  # rank 1 wrote into the same folder
    assert not (trained / "checkpoint-4" / "training_state" / "model.safetensors").exists()  # no second weight copy
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]  # no .tmp

    # Plain transformers, without this package: the saved config is the unpatched model's.
    check = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
             f"d = {str(trained / 'checkpoint-4')!r}; m = AutoModelForCausalLM.from_pretrained(d); "
             "t = AutoTokenizer.from_pretrained(d); ids = t(['w5 w6 w7 w8'], return_tensors='pt').input_ids; "
             "loss = m(input_ids=ids, labels=ids).loss; "
             "assert 'hf_ring_attention' not in sys.modules and m.config.use_cache, m.config; "
             "assert m.config._attn_implementation != 'hf_ring'; print(float(loss))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=assets)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.isfinite(torch.tensor(float(out.stdout.split()[-1])))
    initial, final = _weights(assets / "tiny"), _weights(trained / "checkpoint-4")
    assert any(not torch.equal(initial[k], final[k]) for k in initial), "training did not change the weights"


def test_resume_equals_uninterrupted_run(assets, trained):
    # Resume into (a copy of) the same folder: metrics after step 2 are dropped and rewritten,
    # checkpoint-4 is replaced, and the leftover of an interrupted save is cleared.
    resumed = assets / "resumed"
    shutil.copytree(trained, resumed)
    (resumed / "checkpoint-3.tmp-crashed" / "training_state").mkdir(parents=True)
    proc = _launch(assets, "--output-dir", str(resumed), "--resume-from", str(resumed / "checkpoint-2"))
    assert "steps 2 -> 4" in proc.stdout + proc.stderr
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]
    metrics, again = _metrics(trained), _metrics(resumed)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(metrics, again):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
    final, resumed_final = _weights(trained / "checkpoint-4"), _weights(resumed / "checkpoint-4")
    for name, w in final.items():
        torch.testing.assert_close(resumed_final[name], w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_non_empty_output_dir_is_refused(assets, trained):
    before = sorted(p.name for p in trained.iterdir())
    proc = _launch(assets, "--output-dir", str(trained), expect_ok=False)  # returns: both ranks exited
    assert proc.returncode != 0
    assert f"output_dir {trained} is not empty" in proc.stderr, proc.stderr[-3000:]
    assert "--overwrite-output-dir true" in proc.stderr and "--resume-from" in proc.stderr
    assert "world 2" not in proc.stdout + proc.stderr  # refused before the model was loaded
    assert sorted(p.name for p in trained.iterdir()) == before


def test_overwrite_output_dir(assets, trained):
    over = assets / "overwritten"
    shutil.copytree(trained, over)
    _launch(assets, "--output-dir", str(over), "--overwrite-output-dir", "true", "--max-steps", "2")
    # Only the new run: its 2 steps (equal to the first run's first 2: same seed, data and
    # weights; the schedules agree up to there), its checkpoint-2, the old checkpoint-4 gone.
    metrics = _metrics(over)
    assert [m["step"] for m in metrics] == [1, 2]
    for a, b in zip(_metrics(trained), metrics):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
    assert sorted(p.name for p in over.iterdir()) == ["checkpoint-2", "metrics.jsonl"]


def test_incomplete_checkpoint_is_refused(assets, trained, tmp_path):
    example = _example()

    def refused(path, *expected):
        config = example.TrainConfig(output_dir=str(tmp_path / "out"), resume_from=str(path))
        with pytest.raises(ValueError, match=re.escape(f"incomplete checkpoint {path}")) as err:
            example.check_run_dirs(config)
        for text in expected:
            assert text in str(err.value), str(err.value)

    example.check_run_dirs(example.TrainConfig(output_dir=str(tmp_path / "out"),
                                               resume_from=str(trained / "checkpoint-2")))  # complete: accepted
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(trained / "checkpoint-2", broken)
    (broken / "trainer_state.json").unlink()
    (broken / "model.safetensors").unlink()
    refused(broken, "trainer_state.json", "model weights")
    leftover = tmp_path / "checkpoint-2.tmp-20261203-1"  # an unfinished save, otherwise complete
    shutil.copytree(trained / "checkpoint-2", leftover)
    refused(leftover, "*.tmp-*")
    shutil.rmtree(leftover / "training_state")
    refused(leftover, "training_state/")
    rng = tmp_path / "rng" / "checkpoint-2"
    shutil.copytree(trained / "checkpoint-2", rng)
    (rng / "training_state" / "random_states_1.pkl").unlink()  # accelerate would skip it silently
    refused(rng, "random_states_1.pkl")
    with pytest.raises(ValueError, match="overwrite_output_dir=true would delete"):
        example.check_run_dirs(example.TrainConfig(output_dir=str(trained), overwrite_output_dir=True,
                                                   resume_from=str(trained / "checkpoint-2")))


def test_activation_offload_needs_checkpointing():
    example = _example()
    with pytest.raises(ValueError, match="gradient_checkpointing: true"):
        example.load_config(["--activation-offload", "true", "--gradient-checkpointing", "false"])
    config = example.load_config(["--activation-offload", "true", "--gradient-checkpointing", "true"])
    assert config.activation_offload and config.gradient_checkpointing
