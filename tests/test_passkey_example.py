"""examples/eval_passkey.py: prompt construction, and one run under `accelerate launch` (ring 2).

The run uses the demo model (SmolLM2-135M) on 160- and 300-token prompts (300 is not a
multiple of 2 * ring), keys at depth 0 and 1. Checks: one row per (length, depth), the CSV,
JSON and heatmap written, and the two scores consistent: when every key token is the argmax
of the teacher-forced ring forward, greedy ring_generate must have produced the key (greedy
decoding is that argmax, step by step, through the sharded cache instead of the forward).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "eval_passkey.py")


def _module():
    sys.path.insert(0, os.path.dirname(SCRIPT))  # it imports the RoPE options of eval_perplexity.py
    try:
        spec = importlib.util.spec_from_file_location("eval_passkey", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return mod


@pytest.fixture(scope="module")
def tokenizer():
    demo = pytest.importorskip("hf_ring_attention.demo")
    try:
        path = demo.demo_model_dir()
    except ImportError as exc:
        pytest.skip(f"demo assets not installed: {exc}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_prompt_has_exact_length_and_needle_at_depth(tokenizer):
    mod = _module()
    sentences = mod.filler_sentences("grass", tokenizer, 600)
    needle = tokenizer(mod.NEEDLE.format(key="12345"), add_special_tokens=False)["input_ids"]
    starts = []
    for depth in (0.0, 0.5, 1.0):
        ids = mod.passkey_prompt(tokenizer, sentences, 600, depth, "12345")
        assert len(ids) == 600
        at = [i for i in range(len(ids)) if ids[i:i + len(needle)] == needle]
        assert len(at) == 1
        starts.append(at[0])
    head = len(tokenizer(mod.INTRO, add_special_tokens=False)["input_ids"])
    tail = len(tokenizer(mod.QUESTION, add_special_tokens=False)["input_ids"])
    assert starts[0] == head and starts[2] == 600 - tail - len(needle)  # right after the intro / before the question
    assert starts[0] < starts[1] < starts[2]
    with pytest.raises(ValueError, match="shorter than the prompt"):
        mod.passkey_prompt(tokenizer, sentences, 20, 0.5, "12345")


def test_accelerate_launch_ring2(tokenizer, tmp_path):
    out = tmp_path / "passkey"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "configs", "accelerate", "cpu_2proc.yaml"), "--main_process_port", "0", SCRIPT,
           "--lengths", "160,300", "--depths", "0,1", "--max-new-tokens", "6", "--output-dir", str(out),
           "--label", "t"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((int(r["length"]), float(r["depth"])) for r in rows) == [(160, 0), (160, 1), (300, 0), (300, 1)]
    for r in rows:
        assert r["ring_size"] == "2" and len(r["key"]) == 5
        if r["tf_key_argmax"] == "True":
            assert r["retrieved"] == "True", r
    assert (out / "results.json").exists() and os.path.getsize(out / "passkey.png") > 1000
