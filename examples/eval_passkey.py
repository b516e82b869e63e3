# Copyright the hf_ring_attention authors. Licensed under the Apache License, Version 2.0.
"""Passkey retrieval at long context: a random 5-digit key hidden at some depth of filler text.

The prompt (Mohtashami & Jaggi 2023, "Landmark Attention", the task most long-context papers
report beside perplexity) reads: an instruction, filler, "The pass key is 12345. Remember it.
12345 is the pass key.", more filler, "What is the pass key? The pass key is". Each
(length, depth, trial) gets its own key. Two scores per prompt, both exact over a ring:

* generated: ``hf_ring_attention.ring_generate`` (ring prefill, sharded KV cache), greedy,
  ``--max-new-tokens`` tokens; retrieved when the first 5-digit number in them is the key;
* teacher-forced: the exact ring forward over prompt + " <key>": the log-likelihood of the
  key's tokens and whether every one of them is the argmax (a cross-check of the generated
  answer through the plain forward path).

RoPE scaling options are those of ``examples/eval_perplexity.py`` (``--rope-scaling yarn
--rope-factor 4``). Offline demo (SmolLM2-135M, 8192-token native context; CPU, ring 2)::

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml examples/eval_passkey.py \\
        --lengths 1024,2048,4096,8192,16384 --depths 0,0.25,0.5,0.75,1 --trials 1 --label smollm2
    accelerate launch ... (same) --rope-scaling yarn --rope-factor 4 --label smollm2-yarn4

Each run prints a table, appends its rows to ``<output-dir>/results.csv`` and ``results.json``
and redraws ``<output-dir>/passkey.png``: one depth x length heatmap of retrieval per label.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import time

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_ring_attention as hra
from eval_perplexity import DTYPES, _int_list, apply_rope_scaling, check_rope, rope_choices  # same RoPE options

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
GRASS = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FIELDS = ["label", "length", "depth", "trial", "key", "retrieved", "answer", "tf_key_logprob", "tf_key_argmax",
          "rope_scaling", "rope_factor", "filler", "dtype", "ring_size", "seconds"]


def filler_sentences(kind: str, tokenizer, needed: int) -> list[list[int]]:
    """Filler as token lists of whole sentences (grass: the classic five; kjv: verses of the demo corpus)."""
    if kind == "grass":
        one = tokenizer(GRASS, add_special_tokens=False)["input_ids"]
        return [one] * (needed // len(one) + 2)
    from hf_ring_attention.demo import demo_corpus  # optional [demo] extra

    out, total = [], 0
    for doc in demo_corpus(verse_numbers=False):
        for verse in doc["text"].split("\n\n"):
            ids = tokenizer(" " + verse.replace("\n", " "), add_special_tokens=False)["input_ids"]
            out.append(ids)
            total += len(ids)
            if total > needed + 1000:
                return out
    raise ValueError(f"the KJV corpus has fewer than {needed} tokens of filler")


def passkey_prompt(tokenizer, sentences: list[list[int]], length: int, depth: float, key: str) -> list[int]:
    """Token ids of exactly ``length`` tokens: intro, filler with the needle at ``depth`` (0..1), question."""
    head = tokenizer(INTRO, add_special_tokens=False)["input_ids"]
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    tail = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(f"length {length} is shorter than the prompt without filler ({length - budget} tokens)")
    filler, total = [], 0
    for s in sentences:  # whole sentences, then part of one to reach the length exactly
        if total == budget:
            break
        filler.append(s[:budget - total])
        total += len(filler[-1])
    at = round(depth * len(filler))  # between sentences: 0 = right after the intro, 1 = right before the question
    body = [t for s in filler[:at] for t in s] + needle + [t for s in filler[at:] for t in s]
    return head + body + tail


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, answer: torch.Tensor, groups) -> tuple[float, bool]:
    """Exact ring forward over prompt + answer: (sum of log p(answer tokens), all answer tokens argmax)."""
    full = torch.cat([ids, answer], dim=1)  # (1, N + A)
    n, a = ids.shape[1], answer.shape[1]
    batch = hra.shard_batch({"input_ids": full}, groups)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     ring_layout=batch["ring_layout"], ring_documents=batch["ring_documents"]).last_hidden_state
    if groups.sp_size > 1:  # (1, S_local, H) -> (1, N', H)
        hidden = hra.zigzag_unshard(hidden.contiguous(), dim=1, group=groups.sp_group)
    logp = torch.log_softmax(head(hidden[0, n - 1:n + a - 1]).float(), dim=-1)  # (A, V): predicts each answer token
    target = answer[0].to(logp.device)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def evaluation_function(config: dict, args: argparse.Namespace) -> list[dict]:
    groups = hra.setup_groups(config["ring_size"])  # New code: one ring per prompt; dp rings share the prompts
    state = PartialState()
    if state.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    model_path = args.model
    if model_path == "demo":
        from hf_ring_attention.demo import demo_model_dir  # optional [demo] extra

        with state.main_process_first():
            model_path = demo_model_dir()
    model_config = AutoConfig.from_pretrained(model_path)
    apply_rope_scaling(model_config, config["rope_scaling"], config["rope_factor"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, config=model_config, dtype=config["dtype"])
    model.to(state.device).eval()
    hra.apply_ring_attention(model, groups)  # New code: exact ring attention (prefill and teacher forcing)
    sentences = filler_sentences(args.filler, tokenizer, max(config["lengths"]))

    cases = [(n, d, t) for n in config["lengths"] for d in config["depths"] for t in range(config["trials"])]
    rows = []
    for n, depth, trial in cases[groups.dp_rank::groups.dp_size]:
        key = str(random.Random(f"{args.seed}-{n}-{depth}-{trial}").randint(10000, 99999))
        ids = torch.tensor([passkey_prompt(tokenizer, sentences, n, depth, key)], device=state.device)  # (1, n)
        start = time.perf_counter()
        out = hra.ring_generate(model, ids, groups, max_new_tokens=config["max_new_tokens"], do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, n:], skip_special_tokens=True)
        found = re.search(r"\d{5}", text)
        answer = torch.tensor([tokenizer(" " + key, add_special_tokens=False)["input_ids"]], device=state.device)
        logprob, argmax = teacher_forced(model, ids, answer, groups)
        rows.append({"label": args.label, "length": n, "depth": depth, "trial": trial, "key": key,
                     "retrieved": bool(found and found.group() == key), "answer": text.strip(),
                     "tf_key_logprob": round(logprob, 4), "tf_key_argmax": argmax,
                     "rope_scaling": config["rope_scaling"], "rope_factor": config["rope_factor"],
                     "filler": args.filler, "dtype": args.dtype, "ring_size": groups.sp_size,
                     "seconds": round(time.perf_counter() - start, 2)})
        state.print(f"L={n} depth={depth:.2f} trial={trial} key={key} answer={text.strip()!r} "
                    f"retrieved={rows[-1]['retrieved']} tf_logprob={logprob:.2f} tf_argmax={argmax} "
                    f"({rows[-1]['seconds']} s)")
    if dist.is_initialized() and groups.dp_size > 1:  # every ring's rows to every rank
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, rows if groups.sp_rank == 0 else [])
        rows = [r for part in every for r in part]
    if state.is_main_process:
        print_table(rows)
        png = save_results(rows, args.output_dir)
        print(f"\nresults appended to {args.output_dir}/results.csv and results.json; heatmap: {png}")
    state.wait_for_everyone()
    return rows


def print_table(rows: list[dict]) -> None:
    """Retrieval (generated / teacher-forced argmax) per length, over depths and trials."""
    print(f"\n{'label':<20} {'length':>7} {'generated':>10} {'teacher-forced':>15} {'mean key logprob':>17}")
    for n in sorted({r["length"] for r in rows}):
        sel = [r for r in rows if r["length"] == n]
        gen = sum(r["retrieved"] for r in sel)
        tf = sum(r["tf_key_argmax"] for r in sel)
        lp = sum(r["tf_key_logprob"] for r in sel) / len(sel)
        print(f"{sel[0]['label']:<20} {n:>7} {gen:>5}/{len(sel):<4} {tf:>10}/{len(sel):<4} {lp:>17.2f}")


def save_results(rows: list[dict], output_dir: str) -> str:
    """Append rows to results.csv / results.json and redraw passkey.png; returns the PNG path."""
    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, "results.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    json_path = os.path.join(output_dir, "results.json")
    previous = json.load(open(json_path, encoding="utf-8")) if os.path.exists(json_path) else []
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(previous + rows, fh, indent=1)
    return plot_results(csv_path, os.path.join(output_dir, "passkey.png"))


def plot_results(csv_path: str, png_path: str) -> str:
    """One heatmap per label: depth (rows) x length (columns), share of trials retrieved by generation.
    A rerun of a (label, length, depth, trial) replaces the older row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="", encoding="utf-8") as fh:
        latest = {(r["label"], r["length"], r["depth"], r["trial"]): r for r in csv.DictReader(fh)}
    labels = sorted({k[0] for k in latest})
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels) + 1, 4), squeeze=False)
    for i_ax, (ax, label) in enumerate(zip(axes[0], labels)):
        mine = [r for k, r in latest.items() if k[0] == label]
        lengths = sorted({int(r["length"]) for r in mine})
        depths = sorted({float(r["depth"]) for r in mine})
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                hits = [r["retrieved"] == "True" for r in mine if float(r["depth"]) == d and int(r["length"]) == n]
                if hits:
                    grid[i, j] = sum(hits) / len(hits)
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if i_ax == 0:
            ax.set_ylabel("key depth")
        ax.set_title(label)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not torch.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="retrieved (greedy ring_generate)")
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png_path


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 0,0.5,1)") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"depths {text!r} must be fractions in [0, 1]")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default="demo", help="hub name or local folder; 'demo': the embedded SmolLM2-135M")
    parser.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192], help="prompt lengths in tokens")
    parser.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="where the key sits in the filler, 0 (start) .. 1 (end)")
    parser.add_argument("--trials", type=int, default=1, help="prompts (keys) per length and depth")
    parser.add_argument("--filler", default="grass", choices=["grass", "kjv"],
                        help="'grass': the classic repeated sentences; 'kjv': verses of the demo corpus")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="keys are drawn from (seed, length, depth, trial)")
    parser.add_argument("--rope-scaling", default="none", help=f"one of {rope_choices()}")
    parser.add_argument("--rope-factor", type=float, default=None, help="RoPE scaling factor (>= 1)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--ring-size", type=int, default=2, help="processes per prompt; must divide the world size")
    parser.add_argument("--label", default=None, help="name of this run in the plot (default: model + rope)")
    parser.add_argument("--output-dir", default="outputs/passkey")
    args = parser.parse_args(argv)
    check_rope(args.rope_scaling, args.rope_factor)  # before any process loads a model
    if args.trials < 1 or args.max_new_tokens < 5:
        parser.error("--trials must be >= 1 and --max-new-tokens >= 5 (a key has 5 digits)")
    if args.label is None:
        args.label = os.path.basename(os.path.normpath(args.model)) + \
            ("" if args.rope_scaling == "none" else f"-{args.rope_scaling}{args.rope_factor:g}")
    return args


def main():
    args = parse_args()
    config = {"lengths": args.lengths, "depths": args.depths, "trials": args.trials,
              "max_new_tokens": args.max_new_tokens, "ring_size": args.ring_size, "dtype": DTYPES[args.dtype],
              "rope_scaling": args.rope_scaling, "rope_factor": args.rope_factor}
    evaluation_function(config, args)


if __name__ == "__main__":
    main()
