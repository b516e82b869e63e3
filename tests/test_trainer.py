"""RingTrainer / RingSFTTrainer make the same updates as the plain single-process Trainer.

Reference: transformers' ``Trainer`` (TRL's ``SFTTrainer``) in the pytest process, one process,
the same seed, model init and arguments, except per_device_train_batch_size = dp x the ring's
(one process sees the GLOBAL batch; accelerate's seedable sampler gives both the same row
order). Every case runs two optimizer steps with linear lr decay (a second scheduler step per
optimizer step would show) and records the parameters after each step and the logged loss and
grad norm. One spawn per world:
- ring 2 (2 processes):
  - sgd: SGD, no clipping, rows of 30 tokens (not a multiple of 2 x ring: shard_batch pads);
  - adamw_accum2: AdamW (weight decay), accumulation 2, clipping at 1.0 (the true grad norm
    decides the clip), checkpoints after each step; then resume: a new trainer (other weights)
    resumes from checkpoint-1 and must end where the uninterrupted run ends; the checkpoint
    is an ordinary transformers one (no "hf_ring" in its config; loads and runs).
- dp 2 x ring 2 (4 processes):
  - sgd: as above;
  - sgd_accum2_padded: SGD, accumulation 2, rows of 9..30 tokens right-padded by transformers'
    DataCollatorForLanguageModeling (attention mask -> ignored labels), Mistral with sliding
    window 12; after training ``evaluate()`` on 5 rows (the rings get 3 and 2: uneven), against
    the reference Trainer evaluating the set as one batch (the token-weighted loss over the set);
  - sft_packing: TRL SFTTrainer with packing (BFD, padding-free: one row per micro-batch with
    restarting position_ids and flash-attn kwargs), SGD, accumulation 2, max_length 30; then
    ``evaluate()`` on 10 packed documents, as above;
  - fsdp2_sgd_accum2: the model sharded over all 4 ranks by transformers' FSDP2 at load time
    (``from_pretrained(distributed_config=DistributedConfig(fsdp_size=4))``) instead of DDP;
  - zero3_sgd_accum2_padded: sgd_accum2_padded (evaluation included) under DeepSpeed ZeRO-3
    over all 4 ranks (TrainingArguments(deepspeed=...); gloo, DeepSpeed's CPU accelerator).

Tolerances, relative, norm over all parameters:
- parameters after each step: 1e-5; the update (after - initial): 1e-5 for SGD (measured
  ~1e-6: fp32 on both sides, different summation orders). A wrong loss divisor (a factor of 2
  at least), a missing ring's or micro-batch's data, or a second scheduler step move the update
  by >= 25%. AdamW divides g by sqrt(v) + eps, which amplifies the noise of near-zero gradient
  components: update 1e-4 (measured ~2e-5); AdamW normalises the scale away, so that case
  checks clipping, decay, accumulation and resume instead.
- logged loss and grad norm: 1e-5 (the same token losses summed in another order).
- resume: the same CPU ops on the same data and RNG state: bitwise equal expected, 1e-6 allowed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dist_utils import run_ranks
from models import tiny_model

STEPS = 2
ROW_LEN = 30
B = 2  # rows per ring per micro-batch
EVAL_ROWS = 5
# name: (trainer, family, optimizer, accumulation, data, max_grad_norm)
CASES = {
    "sgd": ("trainer", "llama", "sgd", 1, "fixed", 0.0),
    "adamw_accum2": ("trainer", "llama", "adamw_torch", 2, "fixed", 1.0),
    "sgd_accum2_padded": ("trainer", "mistral", "sgd", 2, "padded", 0.0),
    "sft_packing": ("sft", "llama", "sgd", 2, "documents", 0.0),
    "fsdp2_sgd_accum2": ("trainer", "llama", "sgd", 2, "fixed", 0.0),
    "zero3_sgd_accum2_padded": ("trainer", "mistral", "sgd", 2, "padded", 0.0),
}
HAS_TRL = importlib.util.find_spec("trl") is not None  # the SFTTrainer case needs the [trl] extra
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
WORLDS = {2: ("sgd", "adamw_accum2"),
          4: ("sgd", "sgd_accum2_padded", *(("sft_packing",) if HAS_TRL else ()), "fsdp2_sgd_accum2",
              *(("zero3_sgd_accum2_padded",) if HAS_DEEPSPEED else ()))}
EXTRA = {"adamw_accum2": dict(save_strategy="steps", save_steps=1)}  # checkpoints for the resume check
ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False}}
RING_EXTRA = {"zero3_sgd_accum2_padded": dict(deepspeed=ZERO3)}  # the reference is one plain process


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _rows(n: int, lengths: tuple[int, int], *, seed: int = 0, labels: bool = True):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 96, (int(torch.randint(*lengths, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return Dataset.from_dict({"input_ids": rows, **({"labels": rows} if labels else {})})


def _setup(name: str, dp: int, out: str, *, ring_size: int | None, **overrides):
    """The trainer of case ``name``: RingTrainer/RingSFTTrainer when ring_size is set, else the plain one."""
    import hf_ring_attention as hra

    kind, family, optim, accum, data, clip = CASES[name]
    common = dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=B * (dp if ring_size is None else 1),
                  gradient_accumulation_steps=accum, optim=optim, learning_rate=0.1 if optim == "sgd" else 1e-3,
                  weight_decay=0.1 if optim != "sgd" else 0.0, max_grad_norm=clip, lr_scheduler_type="linear",
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=3, disable_tqdm=True,
                  per_device_eval_batch_size=EVAL_ROWS if ring_size is None else B)
    common.update(overrides)
    model, tok, ring = tiny_model(family), _tokenizer(), ({} if ring_size is None else {"ring_size": ring_size})
    if name.startswith("fsdp2") and ring_size is not None:
        model = _fsdp2(model, out)
    n_rows = B * dp * accum * STEPS
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        # SFTConfig turns bf16 autocast on by default: off, to compare in fp32.
        args = SFTConfig(**common, packing=True, max_length=ROW_LEN, bf16=False)
        docs = _rows(8 * n_rows, (3, 21), seed=1, labels=False)  # packed into rows of <= 30 (best-fit decreasing)
        evaluation = _rows(10, (3, 21), seed=4, labels=False)  # packed into 4 rows: rings get 2 and 2
        return (hra.RingSFTTrainer if ring else SFTTrainer)(model=model, args=args, train_dataset=docs,
                                                             eval_dataset=evaluation, processing_class=tok, **ring)
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, default_data_collator

    if data == "padded":
        dataset, collator = _rows(n_rows, (9, 31), labels=False), DataCollatorForLanguageModeling(tok, mlm=False)
    else:
        dataset, collator = _rows(n_rows, (ROW_LEN, ROW_LEN + 1)), default_data_collator
    evaluation = _rows(EVAL_ROWS, (12, 27), seed=2, labels=False) if data == "padded" else None
    return (hra.RingTrainer if ring else Trainer)(model=model, args=TrainingArguments(**common),
                                                  train_dataset=dataset, eval_dataset=evaluation,
                                                  data_collator=collator, processing_class=tok, **ring)


def _fsdp2(model, out):
    """The same weights, sharded over all W ranks at load time by transformers' own FSDP2
    (``from_pretrained(distributed_config=...)``; accelerate's FSDP plugin needs GPU processes)."""
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    path = os.path.join(out, "init")
    model.save_pretrained(path)  # written by rank 0
    dist.barrier()
    return type(model).from_pretrained(path, dtype=torch.float32,
                                       distributed_config=DistributedConfig(fsdp_size=dist.get_world_size()))


def _flat(params):
    """All parameters as one float64 numpy vector (numpy: returned by value from the spawned ranks).
    FSDP2's DTensors and DeepSpeed ZeRO-3's partitions are gathered (collectives: every rank calls
    this at the same point)."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return _flat([p.detach().clone() for p in params])
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().double()
                      for p in params]).numpy()


def _train(trainer, **kwargs) -> dict:
    from transformers import TrainerCallback

    params = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            params.append(_flat(model.parameters()))

    trainer.add_callback(Snapshot())
    init = _flat(trainer.model.parameters())
    trainer.train(**kwargs)
    logs = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    out = {"init": init, "params": params, "logs": logs}
    if trainer.eval_dataset is not None:
        out["eval"] = trainer.evaluate()["eval_loss"]
    return out


def _run(world: int, out, *, ring_size: int | None) -> dict:
    dp = world // 2
    results = {name: _train(_setup(name, dp, os.path.join(out, name), ring_size=ring_size, **EXTRA.get(name, {}),
                                   **(RING_EXTRA.get(name, {}) if ring_size else {})))
               for name in WORLDS[world]}
    if ring_size is not None and "adamw_accum2" in results:
        resumed = _setup("adamw_accum2", dp, os.path.join(out, "resumed"), ring_size=ring_size)
        with torch.no_grad():  # other weights: every weight must come from the checkpoint
            for p in resumed.model.parameters():
                p.add_(1.0)
        results["resumed"] = _train(resumed, resume_from_checkpoint=os.path.join(out, "adamw_accum2", "checkpoint-1"))
    return results


def _ranks(rank, world, ring, out):
    results = _run(world, out, ring_size=ring)
    if world == 4:
        results["bad_batch"] = _bad_batch_on_one_ring(out)
    return results


def _bad_batch_on_one_ring(out) -> str:
    """Ring 1's first batch is left-padded (rows of different lengths, padding_side="left"), ring 0's is
    not: every rank must raise (ring 0 from the window's all-reduce) instead of waiting for ring 1."""
    from transformers import DataCollatorForLanguageModeling

    trainer = _setup("sgd", 2, os.path.join(out, "bad"), ring_size=2, train_sampling_strategy="sequential")
    tok = _tokenizer()
    tok.padding_side = "left"
    trainer.data_collator = DataCollatorForLanguageModeling(tok, mlm=False)
    rows = [[5] * 8, [6] * 8, [7] * 8, [8] * 5] + [[9] * 8] * 4  # ring 0: rows 0, 1; ring 1: rows 2, 3
    trainer.train_dataset = trainer.train_dataset.from_dict({"input_ids": rows})
    with pytest.raises(ValueError) as err:
        trainer.train()
    return str(err.value)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("world", [2, 4])
def test_ring_trainer_equals_single_process_trainer(world, tmp_path):
    from accelerate.state import AcceleratorState

    ranks = run_ranks(_ranks, world, 2, str(tmp_path / "ring"), timeout=600)
    ref = _run(world, tmp_path / "ref", ring_size=None)
    AcceleratorState._reset_state(reset_partial_state=True)
    got = ranks[0]
    for name in WORLDS[world]:
        r, g = ref[name], got[name]
        assert len(g["params"]) == len(r["params"]) == STEPS and len(g["logs"]) == len(r["logs"]) == STEPS
        for step in range(STEPS):
            update = _rel(g["params"][step] - g["init"], r["params"][step] - r["init"])
            params = _rel(g["params"][step], r["params"][step])
            (loss, norm), (ref_loss, ref_norm) = g["logs"][step], r["logs"][step]
            loss, norm = abs(loss - ref_loss) / ref_loss, abs(norm - ref_norm) / ref_norm
            print(f"{name} step {step + 1}: update {update:.2e} parameters {params:.2e} loss {loss:.2e} "
                  f"grad norm {norm:.2e}")
            assert update < (1e-4 if "adamw" in name else 1e-5) and params < 1e-5, \
                f"{name} step {step + 1}: update {update:.3g}, parameters {params:.3g}"
            assert loss < 1e-5 and norm < 1e-5, f"{name} step {step + 1}: logged loss {loss:.3g}, grad norm {norm:.3g}"
        if "eval" in r:
            for rank_results in ranks:  # every rank reports the same eval loss
                err = abs(rank_results[name]["eval"] - r["eval"]) / r["eval"]
                print(f"{name} eval loss: {err:.2e}")
                assert err < 1e-5, (rank_results[name]["eval"], r["eval"])
    if world == 4:
        assert all("left or inner padding" in r["bad_batch"] for r in ranks[2:]), ranks[2]["bad_batch"]
        assert all("another ring" in r["bad_batch"] for r in ranks[:2]), ranks[0]["bad_batch"]
    if "resumed" in got:
        _check_resume(got["adamw_accum2"], got["resumed"], tmp_path / "ring" / "adamw_accum2" / "checkpoint-2")


def _check_resume(full, resumed, checkpoint):
    from transformers import AutoModelForCausalLM

    assert len(resumed["params"]) == 1, "the resumed run should make one step"
    assert _rel(resumed["params"][-1], full["params"][-1]) < 1e-6, "the resumed run ends elsewhere"
    assert abs(resumed["logs"][-1][0] - full["logs"][-1][0]) < 1e-6 * full["logs"][-1][0]
    # An ordinary checkpoint: the model's own attention implementation. (Were "hf_ring" saved, this
    # forward would raise: the package is imported here, but the loaded model was never patched.)
    assert "hf_ring" not in (checkpoint / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def _refused(tmp_path, **kw):
    import hf_ring_attention as hra
    from transformers import TrainingArguments

    trainer_kw = {k: kw.pop(k) for k in ("compute_loss_func", "compute_metrics", "model", "ring_size") if k in kw}
    trainer_kw.setdefault("ring_size", 1)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **kw)
    return hra.RingTrainer(model=trainer_kw.pop("model", None) or tiny_model(), args=args,
                           train_dataset=_rows(4, (8, 9)), **trainer_kw)


@pytest.mark.parametrize("setting, error, match", [
    ({"parallelism_config": "cp"}, ValueError, "parallelism_config.cp_size=2"),
    ({"train_sampling_strategy": "group_by_length"}, ValueError, "group_by_length"),
    ({"auto_find_batch_size": True}, ValueError, "auto_find_batch_size"),
    ({"accelerator_config": {"dispatch_batches": True}}, ValueError, "dispatch_batches"),
    ({"label_smoothing_factor": 0.1}, NotImplementedError, "label_smoothing_factor"),
    ({"neftune_noise_alpha": 5.0}, NotImplementedError, "NEFTune"),
    ({"compute_loss_func": lambda *a, **k: 0}, NotImplementedError, "compute_loss_func"),
    ({"compute_metrics": lambda p: {}}, NotImplementedError, "loss-only"),
    ({"model": "softcap"}, NotImplementedError, "softcapping"),
])
def test_refuses_what_cannot_be_exact(setting, error, match, tmp_path):
    """Settings that cannot give the single-device update fail at construction, naming the setting
    (from arguments that are identical on every rank, so all ranks raise together)."""
    from accelerate import ParallelismConfig

    if setting.get("parallelism_config") == "cp":
        setting = {"parallelism_config": ParallelismConfig(cp_size=2)}
    if setting.get("model") == "softcap":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        setting = {"model": Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           num_key_value_heads=1, head_dim=16))}
    with pytest.raises(error, match=match):
        _refused(tmp_path, **setting)


def test_ring_size_must_fit_the_world_and_eval_is_loss_only(tmp_path):
    with pytest.raises(ValueError, match="ring_size=2 needs 2 processes"):
        _refused(tmp_path, ring_size=2)
    with pytest.raises(ValueError, match="positive int"):
        _refused(tmp_path, ring_size=0)
    trainer = _refused(tmp_path)
    with pytest.raises(NotImplementedError, match="prediction_loss_only=True"):
        trainer.predict(_rows(2, (8, 9)))
