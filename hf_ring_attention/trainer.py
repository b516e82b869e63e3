"""Ring attention inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

``RingTrainer(model=..., args=..., train_dataset=..., ring_size=2)`` trains like ``Trainer`` on
one device holding the global batch (dp x per_device_train_batch_size rows per micro-batch),
with every sequence split over a ring of ``ring_size`` processes (world = dp x ring, launched by
``accelerate launch`` / ``torchrun``). ``RingSFTTrainer`` does the same for ``trl.SFTTrainer``,
packing and padding-free batches included. Run::

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml examples/trainer_long_context.py

What the mixin changes, and why (every other Trainer method runs unchanged):

* ``__init__``: refuses what cannot be exact (from arguments identical on every rank, before
  any collective), then ``setup_groups(ring_size)`` and ``apply_ring_attention``.
* ``get_train_dataloader`` / ``get_eval_dataloader``: accelerate shards batches by the global
  rank; the ring needs them sharded by the data-parallel rank (every rank of a ring holds the
  same rows). The prepared sampler is re-pointed, as transformers does for its own
  ``BatchRebalanceSampler``.
* ``get_batch_samples``: the Trainer's hook that collects one accumulation window and its
  ``num_items_in_batch``. Here each micro-batch goes through ``shard_batch`` (labels shifted on
  the full sequence, padding, packed documents) and the loss divisor is the window's valid
  targets over all rings, from one world all-reduce that also carries an error flag (so a bad
  batch on one ring stops every rank). ``training_step`` / ``compute_loss`` are the Trainer's:
  they divide by that count and multiply by num_processes (``average_tokens_across_devices``),
  DDP averages over W ranks, so the gradient, the logged loss and the grad norm are those of
  the single-device mean token loss.
* ``evaluation_loop`` / ``prediction_step``: the eval loss is summed per rank and divided by
  the eval set's valid targets (one all-reduce at the end): the token-weighted loss over the
  whole eval set. Every ring runs the same number of forwards (label-free filler batches), as
  FSDP / ZeRO-3 need.
* Checkpoints are the Trainer's own: ``save_pretrained`` does not record the attention
  implementation, so they load without this package, and resuming continues identically.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from transformers import Trainer

from .groups import setup_groups
from .integration import apply_ring_attention
from .sharding import IGNORE_INDEX, shard_batch

__all__ = ["RingTrainer", "RingTrainerMixin"]  # and RingSFTTrainer, built on first access (needs TRL)

# Flash-attention varlen kwargs of padding-free collators (TRL, DataCollatorWithFlattening).
# The ring reads document boundaries from position_ids (shard_batch), so these are dropped.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class RingTrainerMixin:
    """Exact ring attention for a ``transformers.Trainer`` subclass (see the module docstring).

    Args:
        ring_size: processes per sequence; must divide the number of processes.
        *args, **kwargs: those of the Trainer class it is mixed into.

    Raises:
        ValueError / NotImplementedError: settings that cannot give the single-device update
            (context/sequence/tensor parallelism, length-grouped or rebalanced sampling, automatic
            batch size, dispatched or split batches, label smoothing, custom loss functions,
            NEFTune, Liger kernels, logit metrics), a world the ring does not divide, or a
            model ``apply_ring_attention`` refuses.
    """

    _ring_chunked_loss = True  # False: ask apply_ring_attention for transformers' own loss (loss_chunk_size=None)

    def __init__(self, *args, ring_size: int, **kwargs):
        if not isinstance(ring_size, int) or isinstance(ring_size, bool) or ring_size < 1:
            raise ValueError(f"ring_size={ring_size!r} must be a positive int")
        # Before the Trainer builds its Accelerator, which rejects a parallelism_config on its own terms.
        _check_parallelism(getattr(args[1] if len(args) > 1 else kwargs.get("args"), "parallelism_config", None),
                           type(self).__name__)
        super().__init__(*args, **kwargs)
        self._ring_check_settings()
        self.ring_groups = setup_groups(ring_size)
        self._ring_patch(self.model)

    # ---- set-up -------------------------------------------------------------------------------

    def _ring_check_settings(self) -> None:
        """Refuse what cannot be exact; every rank decides from the same arguments."""
        args, name = self.args, type(self).__name__
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != world:
            raise ValueError(f"{name}: accelerate sees {self.accelerator.num_processes} process(es) but the launcher "
                             f"started {world}; on a machine without GPUs set TrainingArguments(use_cpu=True)")
        _check_parallelism(args.parallelism_config or getattr(self.accelerator, "parallelism_config", None), name)
        if args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
            raise ValueError(f"train_sampling_strategy={args.train_sampling_strategy!r} shards batches by the "
                             f"global rank; {name} gives every rank of a ring the same rows: use 'random' or "
                             "'sequential'")
        if args.auto_find_batch_size:
            raise ValueError(f"auto_find_batch_size would let rings pick different batch sizes; {name} needs one: "
                             "set per_device_train_batch_size")
        acc = args.accelerator_config
        if getattr(acc, "dispatch_batches", None) or getattr(acc, "split_batches", False):
            raise ValueError(f"{name} needs accelerator_config dispatch_batches and split_batches off "
                             "(each ring loads its own whole rows)")
        if args.n_gpu > 1:
            raise ValueError(f"{name} runs one process per device (accelerate launch / torchrun), not "
                             f"torch.nn.DataParallel over {args.n_gpu} GPUs")
        loss_only = "logits are sharded over the ring; evaluation is loss-only: drop it"
        refused = {  # setting: (value, why and the fix)
            "label_smoothing_factor": (args.label_smoothing_factor, "label smoothing shifts the labels itself "
                                       "(the ring's labels arrive shifted and sharded): set it to 0"),
            "compute_loss_func": (self.compute_loss_func, "a custom loss sees this rank's shard with shifted "
                                  "labels: use the model's own loss"),
            "neftune_noise_alpha": (args.neftune_noise_alpha, "NEFTune scales its noise by the local sequence "
                                    "length, which the ring divides: unset it"),
            "use_liger_kernel": (args.use_liger_kernel, "Liger replaces the forward the ring patches: unset it"),
            "compute_metrics": (self.compute_metrics, loss_only),
            "preprocess_logits_for_metrics": (self.preprocess_logits_for_metrics, loss_only),
        }
        for key, (value, why) in refused.items():
            if value:
                raise NotImplementedError(f"{name} does not support {key}={value!r}: {why}")
        if not self.model_accepts_loss_kwargs:
            raise NotImplementedError(f"{name} needs a model whose forward takes num_items_in_batch (transformers "
                                      f"causal LMs do); {type(self.model).__name__}'s forward does not")

    def _ring_patch(self, model: torch.nn.Module) -> None:
        # apply_ring_attention's chunked loss is its default; the Trainer only reads outputs.loss, so
        # the logits it leaves out are not missed.
        kwargs = {} if self._ring_chunked_loss else {"loss_chunk_size": None}
        apply_ring_attention(model, self.ring_groups, **kwargs)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if hasattr(self, "ring_groups"):  # model_init re-creates the model in train()
            self._ring_patch(model)
        return model

    # ---- data ---------------------------------------------------------------------------------

    def get_train_dataloader(self):
        return _shard_by_ring(super().get_train_dataloader(), self.ring_groups)

    def get_eval_dataloader(self, eval_dataset=None):
        return _even_steps(super().get_eval_dataloader(eval_dataset), self.ring_groups)

    def get_test_dataloader(self, test_dataset):
        return _even_steps(super().get_test_dataloader(test_dataset), self.ring_groups)

    def _ring_shard(self, batch: Mapping) -> dict:
        """One collated batch of this ring -> this rank's shard (no collective)."""
        batch = {k: v for k, v in batch.items() if k not in VARLEN_KEYS}
        if batch.get("labels") is None:
            raise ValueError(f"{type(self).__name__} needs labels in every batch (got keys {sorted(batch)}); use a "
                             "collator that returns them, e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)")
        pad = getattr(self.processing_class, "pad_token_id", None)
        return shard_batch(batch, self.ring_groups, num_items_in_batch=1.0, pad_token_id=pad or 0)

    def _ring_agree(self, local: torch.Tensor, error: Exception | None, device) -> torch.Tensor:
        """Sum ``local`` (float64 vector) over the world with an error flag; raise on every rank if any failed.

        A collective: called by every rank at the same point, so a batch that fails on one ring
        stops all ranks instead of leaving the others waiting in a collective.
        """
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)
        stats = torch.cat([local.detach().to(torch.float64).cpu().flatten(), flag]).to(device)
        if dist.is_initialized() and self.ring_groups.world_size > 1:
            dist.all_reduce(stats)
        if error is not None:
            raise error
        if stats[-1] > 0:
            raise ValueError("a batch of another ring could not be sharded; see the error on that rank")
        return stats[:-1]

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device) -> tuple[list, torch.Tensor | None]:
        """Collect one accumulation window, shard it, and compute its loss divisor (one all-reduce).

        Returns:
            (this rank's sharded micro-batches, ``num_items_in_batch``): the window's valid targets
            over all rings (divided by W when ``average_tokens_across_devices`` is off, because the
            Trainer then does not multiply the loss by the number of processes).
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:  # the same on every rank: all loaders have the same length
            return batches, None
        shards, error = [], None
        try:
            shards = [self._ring_shard(b) for b in batches]
        except (ValueError, NotImplementedError) as e:
            error = e
        local = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in shards)
        total = max(float(self._ring_agree(torch.tensor([local]), error, device)[0]), 1.0)  # all ignored: loss 0
        if not self.args.average_tokens_across_devices:
            total /= self.ring_groups.world_size
        divisor = torch.tensor(total, dtype=torch.float32, device=device)  # the Trainer's own count dtype
        for s in shards:
            del s["num_items_in_batch"]  # passed by compute_loss instead
        return shards, divisor

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's loop, plus the token-weighted loss over the whole set (one all-reduce)."""
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        if not loss_only:
            raise NotImplementedError(f"{type(self).__name__} evaluates the loss only (logits are sharded over the "
                                      "ring): set TrainingArguments(prediction_loss_only=True); predict() is "
                                      "not supported")
        self._ring_eval = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, valid targets) of this rank
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        total, count = self._ring_agree(self._ring_eval, None, self.args.device).tolist()
        output.metrics[f"{metric_key_prefix}_loss"] = total / count if count else float("nan")
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        shard, error = None, None
        try:
            shard = self._ring_shard(self._prepare_inputs(inputs))
        except (ValueError, NotImplementedError) as e:
            error = e
        self._ring_agree(torch.zeros(0), error, self.args.device)  # every rank runs the forward, or none
        one = torch.ones((), device=self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = model(**{**shard, "num_items_in_batch": one}, use_cache=False).loss  # sum of token losses
        count = (shard["labels"] != IGNORE_INDEX).sum()
        self._ring_eval += torch.stack([loss.detach().double().cpu(), count.double().cpu()])
        return None, None, None  # the loss is reported by evaluation_loop


class RingTrainer(RingTrainerMixin, Trainer):
    """``transformers.Trainer`` with exact ring attention; one extra argument, ``ring_size``."""


def _check_parallelism(pc, name: str) -> None:
    for field in ("cp_size", "sp_size", "tp_size"):
        if (getattr(pc, field, None) or 1) > 1:
            raise ValueError(f"{name} splits sequences over its ring itself; parallelism_config.{field}="
                             f"{getattr(pc, field)} (accelerate's context / sequence / tensor parallelism) cannot "
                             "be combined with it: drop parallelism_config (data parallelism is dp = world / ring_size)")


def _shard_by_ring(loader, groups):
    """Re-point an accelerate-prepared DataLoader from the global rank to the data-parallel rank.

    Returns:
        The same loader (its ``BatchSamplerShard`` now indexed by dp rank / dp size).

    Raises:
        NotImplementedError: the loader is not sharded by a ``BatchSamplerShard`` (iterable
            datasets, which accelerate dispatches from rank 0).
    """
    if groups.world_size == 1:
        return loader
    sampler = _batch_sampler_shard(loader)
    if sampler is None:
        raise NotImplementedError(f"ring training needs a map-style dataset (e.g. a datasets.Dataset); got a "
                                  f"{type(getattr(loader, 'dataset', None)).__name__} loaded by "
                                  f"{type(loader).__name__}")
    sampler.num_processes, sampler.process_index = groups.dp_size, groups.dp_rank
    return loader


def _batch_sampler_shard(loader):
    """accelerate's ``BatchSamplerShard`` of a prepared loader (a batch sampler, or a sampler of batches)."""
    from accelerate.data_loader import BatchSamplerShard

    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if isinstance(sampler, BatchSamplerShard):
            return sampler
    return None


def _even_steps(loader, groups):
    """An eval loader of this ring that yields as many batches as the longest ring's.

    accelerate's ``even_batches`` would pad the last step with repeated rows, counted twice;
    instead every ring gets its own rows once and, where it has fewer batches, a filler batch
    whose labels are all ignored (every rank still runs the same forwards).
    """
    loader = _shard_by_ring(loader, groups)
    if groups.world_size == 1:
        return loader
    sampler = _batch_sampler_shard(loader)
    sampler.even_batches = False
    steps = math.ceil(len(sampler.batch_sampler) / groups.dp_size)
    return _EvenSteps(loader, steps)


class _EvenSteps:
    """Iterate ``loader``, then filler batches (row 0, every label ignored) up to ``steps``."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps
        self.dataset, self.batch_size = loader.dataset, getattr(loader, "batch_size", None)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        n = 0
        for n, batch in enumerate(self.loader, start=1):
            yield batch
        for _ in range(self.steps - n):
            filler = dict(self.loader.collate_fn([self.dataset[0]]))
            if "labels" in filler:  # (without labels the step raises anyway, on every rank)
                filler["labels"] = torch.full_like(filler["labels"], IGNORE_INDEX)
            yield filler


@functools.cache
def _sft_trainer_class():
    try:
        from trl import SFTTrainer
    except ImportError as e:
        raise ImportError("RingSFTTrainer needs TRL: pip install trl") from e

    class RingSFTTrainer(RingTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` with exact ring attention; one extra argument, ``ring_size``.

        Packing and padding-free batches work (documents come from the restarting
        ``position_ids``). TRL computes the loss with its own fused LM head (an instance
        ``forward``), so the model is patched without the package's chunked loss, which would
        wrap that forward.
        """

        _ring_chunked_loss = False

    RingSFTTrainer.__module__ = __name__
    RingSFTTrainer.__qualname__ = "RingSFTTrainer"
    return RingSFTTrainer


def __getattr__(name: str):
    if name == "RingSFTTrainer":  # built on first use: importing this module does not import TRL
        return _sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
