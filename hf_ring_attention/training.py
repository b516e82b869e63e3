"""Training helpers for ring attention under data parallelism (world = dp x ring), via accelerate.

What they guarantee together: one call of :func:`training_step` with the same model, optimizer
and global batch makes the same update as one process running the unsharded model on all of
it, for any ring size, any number of data-parallel rings and any gradient accumulation.

* Data: :func:`make_dataloader` lets accelerate shard batches by the *data-parallel* rank, so
  every rank of a ring sees the same batch and different rings see different batches.
* Loss: every micro-batch of an accumulation window is divided by the number of valid targets
  of the whole window (all micro-batches, all rings) times 1 / W, W = dp x ring: DDP/FSDP
  average the gradients over W ranks and the micro-batch gradients are summed, so the update
  is that of the mean token loss over the global batch (see :func:`shard_window`).

Example (inside ``accelerate launch``)::

    accelerator = make_accelerator(gradient_accumulation_steps=2)
    groups = setup_groups(ring_size=2)
    apply_ring_attention(model, groups)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batches = batch_stream(make_dataloader(dataset, groups, batch_size=1, device=accelerator.device))
    loss = training_step(accelerator, model, optimizer, scheduler, [next(batches), next(batches)], groups)
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from .groups import default_timeout
from .sharding import IGNORE_INDEX, full_targets, shard_sequences


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, *, eos_id: int | None = None,
                   document_boundaries: bool = True, drop_remainder: bool = False,
                   pad_id: int = 0) -> dict[str, list[list[int]]]:
    """Concatenate tokenised documents and cut them into rows of exactly ``seq_len`` tokens.

    Works as a batched ``datasets.Dataset.map`` function (it returns columns of lists).

    Args:
        documents: token ids of each document.
        seq_len: tokens per row.
        eos_id: appended after each document (None: nothing appended).
        document_boundaries: position ids restart at 0 at every document start (and at every
            row start), which ring attention and transformers read as "attend within the document
            only", and ``shard_batch`` as "no target across the boundary". False: positions run
            0..seq_len-1 and documents see each other (plain concatenation).
        drop_remainder: drop the last, partial row instead of padding it.
        pad_id: token of the padding of the last row (its labels are -100).

    Returns:
        ``{"input_ids", "position_ids", "labels"}``, each a list of rows of ``seq_len`` ints;
        labels equal input_ids except -100 on padding. A document longer than what is left of a
        row continues in the next row (positions restart there).

    Raises:
        ValueError: ``seq_len`` < 2.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    tokens: list[int] = []
    positions: list[int] = []
    for doc in documents:
        doc = list(doc) + ([eos_id] if eos_id is not None else [])
        tokens.extend(doc)
        positions.extend(range(len(doc)))
    out: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
    for start in range(0, len(tokens), seq_len):
        ids, pos = tokens[start:start + seq_len], positions[start:start + seq_len]
        pad = seq_len - len(ids)
        if pad and drop_remainder:
            break
        if document_boundaries:
            # A document cut by the previous row's end restarts at 0 in this row.
            k = next((i for i, p in enumerate(pos) if p == 0), len(pos))  # first document start
            pos = [p - pos[0] for p in pos[:k]] + pos[k:]
            # Padding is a document of its own: nothing attends to it and it has no targets.
            pos = pos + list(range(pad))
        else:
            pos = list(range(seq_len))
        out["input_ids"].append(ids + [pad_id] * pad)
        out["position_ids"].append(pos)
        out["labels"].append(ids + [IGNORE_INDEX] * pad)
    return out


def make_dataloader(dataset, groups, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                    device: torch.device | None = None, collate_fn=None, num_workers: int = 0,
                    drop_last: bool = False):
    """A DataLoader prepared by accelerate that shards batches by data-parallel rank.

    ``accelerate.data_loader.prepare_data_loader`` is called with ``num_processes=dp_size`` and
    ``process_index=dp_rank`` (instead of the global rank and world size ``Accelerator.prepare``
    would use), so every rank of one ring gets the same batches. Shuffling uses accelerate's
    seedable sampler with ``seed``: the same order on every rank, a new one each epoch.

    Args:
        dataset: a map-style dataset of equal-length rows (e.g. ``Dataset.with_format("torch")``).
        groups: the ``RingGroups`` of this rank (None: one process).
        batch_size: rows per ring per micro-batch.
        shuffle, seed: shuffle with accelerate's ``SeedableRandomSampler`` seeded with ``seed``.
        device: batches are moved there (e.g. ``accelerator.device``).
        collate_fn, num_workers, drop_last: as for ``torch.utils.data.DataLoader``.

    Returns:
        accelerate's ``DataLoaderShard``; ``len()`` is the number of batches per ring per epoch.
    """
    from accelerate.data_loader import prepare_data_loader

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
                                         num_workers=num_workers, drop_last=drop_last)
    dp_size, dp_rank = (1, 0) if groups is None else (groups.dp_size, groups.dp_rank)
    # dispatch_batches=False: accelerate's dispatcher would broadcast rank 0's batches to the
    # whole world, ignoring num_processes / process_index.
    return prepare_data_loader(loader, device=device, num_processes=dp_size, process_index=dp_rank,
                               split_batches=False, put_on_device=device is not None, dispatch_batches=False,
                               even_batches=True, use_seedable_sampler=shuffle, data_seed=seed)


def batch_stream(dataloader, *, start: int = 0) -> Iterator[dict]:
    """Yield the dataloader's batches forever, epoch after epoch, skipping the first ``start``.

    Resuming after ``k`` consumed batches with ``start=k`` replays the same order (the seedable
    sampler's epoch is set explicitly); the skipped batches are loaded and discarded, which for
    packed token rows costs next to nothing.
    """
    n = len(dataloader)
    if n == 0:
        raise ValueError("the dataloader is empty: the dataset has fewer rows than one batch")
    epoch, skip = divmod(start, n)
    while True:
        dataloader.set_epoch(epoch)
        yield from itertools.islice(dataloader, skip, None)
        epoch, skip = epoch + 1, 0


def _world_sum(x: torch.Tensor, groups) -> torch.Tensor:
    """Sum over every rank of the job (the rings' shards and the data-parallel rings): one all-reduce."""
    if groups is not None and groups.world_size > 1:
        dist.all_reduce(x)
    return x


def count_loss_tokens(shards: Iterable[dict], groups=None) -> torch.Tensor:
    """Valid targets (labels != -100) of the global batch, from every rank's sharded micro-batches.

    A collective (one all-reduce over every rank). The shards of one ring partition its sequences,
    so the sum over all W ranks of their local counts is the count over all rings' full sequences
    (after the label shift, document boundaries and padding of ``shard_batch``).

    Returns:
        A float64 scalar tensor on the labels' device, the same on every rank.
    """
    local = torch.stack([(s["labels"] != IGNORE_INDEX).sum() for s in shards]).sum()
    return _world_sum(local.to(torch.float64), groups)


def shard_window(micro_batches: Sequence[dict], groups=None, *, pad_token_id: int = 0) -> list[dict]:
    """``shard_batch`` every micro-batch of one accumulation window with one shared loss divisor.

    A collective: the window's divisor is ONE all-reduce over every rank, in sight here
    (``shard_batch`` itself communicates nothing). ``num_items_in_batch`` = (valid targets of the
    whole window over all rings) / W. Each rank's loss is then (sum of its token losses) / that;
    summing over the window's micro-batches and averaging over W ranks (what DDP/FSDP do) gives
    sum(token losses) / count: the exact mean over the global batch, whatever the ring size, dp
    size or number of micro-batches.

    Args:
        micro_batches: this ring's full-sequence batches (``input_ids``, ``labels``,
            ``position_ids``, ``attention_mask``; see ``shard_batch``).
        groups: ``RingGroups`` (None: one process).
        pad_token_id: token for padding a length that does not divide by 2 * ring_size.

    Returns:
        The sharded micro-batches, ready for ``model(**shard)``.
    """
    shards = [shard_sequences(*full_targets(b), groups, pad_token_id=pad_token_id) for b in micro_batches]
    world = 1 if groups is None else groups.world_size
    divisor = torch.clamp(count_loss_tokens(shards, groups), min=1.0) / world
    for s in shards:
        s["num_items_in_batch"] = divisor
    return shards


def reduce_loss_for_logging(loss: torch.Tensor | float, groups=None) -> float:
    """The global mean token loss from this rank's (summed over the window) scaled losses.

    Each rank's loss is already divided by (global count / W) (see :func:`shard_window`), so
    the global mean is the sum over the W ranks / W. A collective (one all-reduce over every rank):
    call it on every rank, with a tensor on the device the backend needs (CUDA for NCCL).
    """
    x = torch.as_tensor(loss).detach().to(torch.float64).clone()
    world = 1 if groups is None else groups.world_size
    return _world_sum(x, groups).item() / world


def enable_checkpointing(model, *, offload: bool = False) -> bool:
    """Transformers' activation checkpointing (non-reentrant), the layer inputs optionally offloaded to host.

    Calls ``model.activation_checkpointing_enable(..., offload=offload)``: transformers keeps each
    checkpointed layer's inputs in pinned host memory (``torch.autograd.graph.save_on_cpu``) and copies
    them back for the recompute. The patched model works with it as is: the recompute runs the layer's
    ring pass again with the same ``ring_context`` (its keyword arguments are kept by the checkpoint).

    On a machine with no accelerator the activations are host memory already, and transformers'
    offload would fail (it asks for pinned memory, which needs an accelerator): ``offload`` is then
    ignored and False returned.

    Args:
        model: a transformers ``PreTrainedModel``.
        offload: keep the checkpointed layers' inputs in pinned host memory.

    Returns:
        Whether the inputs are offloaded.

    Raises:
        NotImplementedError: ``offload=True`` with a transformers version whose
            ``activation_checkpointing_enable`` has no ``offload`` argument.
    """
    import inspect

    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers releases before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        enable_params = ()
    else:
        enable_params = inspect.signature(enable).parameters
    offload = offload and _has_accelerator()
    if offload and "offload" not in enable_params:
        raise NotImplementedError("activation offload needs transformers' activation_checkpointing_enable("
                                  "offload=True) (transformers 5.24 has it); upgrade transformers or set offload off")
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs, **({"offload": True} if offload else {}))
    return offload


def _has_accelerator() -> bool:
    try:
        return torch.accelerator.current_accelerator() is not None
    except (AttributeError, RuntimeError):  # torch < 2.6 has no torch.accelerator; 2.6 raises without one
        return torch.cuda.is_available()


def make_accelerator(*, gradient_accumulation_steps: int = 1, mixed_precision: str | None = None,
                     timeout: timedelta | None = None, **kwargs):
    """An ``Accelerator`` set up the way :func:`training_step` relies on.

    * ``cpu=True`` when no GPU is visible: accelerate's launcher starts several local processes
      only through torchrun, and ``PartialState`` then picks gloo/CPU only when told ``cpu``.
    * Gradient accumulation with ``sync_with_dataloader=False``: windows are cut by
      :func:`training_step`, not by where an epoch ends.
    * ``step_scheduler_with_optimizer=False``: the scheduler steps once per optimizer step
      (by default accelerate steps it once per process, for schedules written per sample).

    Args:
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: ``"no"`` / ``"bf16"`` (None: from ``accelerate launch``'s config).
        timeout: the process group's collective timeout (default ``$HF_RING_TIMEOUT`` or 10 min).
        **kwargs: passed to ``Accelerator``.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    plugin = GradientAccumulationPlugin(num_steps=gradient_accumulation_steps, sync_with_dataloader=False)
    kwargs.setdefault("cpu", not torch.cuda.is_available())
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
        handlers.append(InitProcessGroupKwargs(timeout=timeout or default_timeout()))
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_plugin=plugin,
                              step_scheduler_with_optimizer=False, kwargs_handlers=handlers, **kwargs)
    if dist.is_initialized() and accelerator.num_processes != dist.get_world_size():
        # e.g. PartialState() first created without cpu=True on a CPU-only torchrun launch: it
        # initialises torch.distributed yet reports one process, and prepare() would skip DDP.
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} process(es) but torch.distributed has "
                           f"{dist.get_world_size()}: call make_accelerator() before setup_groups() or any "
                           "other accelerate PartialState()")
    return accelerator


def training_step(accelerator, model, optimizer, scheduler, micro_batches: Sequence[dict], groups, *,
                  max_grad_norm: float | None = None, pad_token_id: int = 0) -> dict:
    """One optimizer step over one accumulation window of this ring's full-sequence batches.

    ``accelerator.backward`` divides every loss by ``gradient_accumulation_steps``; the window
    is already normalised by :func:`shard_window`'s divisor, so the loss is multiplied back
    (accelerate's recipe for token-level losses; exact for power-of-two step counts, within
    one rounding otherwise).

    Args:
        accelerator: from :func:`make_accelerator`, with model/optimizer/scheduler prepared.
        micro_batches: ``accelerator.gradient_accumulation_steps`` batches of this ring.
        groups: ``RingGroups``.
        max_grad_norm: clip the global gradient norm (None: no clipping).
        pad_token_id: see :func:`shard_window`.

    Returns:
        ``{"loss": global mean token loss, "grad_norm": float or None}`` (same on every rank).

    Raises:
        ValueError: the number of micro-batches differs from ``gradient_accumulation_steps``.
    """
    steps = accelerator.gradient_accumulation_steps
    if len(micro_batches) != steps:
        raise ValueError(f"got {len(micro_batches)} micro-batches for gradient_accumulation_steps={steps}")
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for shard in shard_window(micro_batches, groups, pad_token_id=pad_token_id):
        with accelerator.accumulate(model):  # no gradient all-reduce until the window's last micro-batch
            loss = model(**shard).loss
            accelerator.backward(loss * steps)
            total += loss.detach().to(torch.float64)
    if not accelerator.sync_gradients:
        raise RuntimeError("accumulation window out of step with accelerate's counter; call training_step only, "
                           "and not accelerator.accumulate elsewhere")
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": reduce_loss_for_logging(total, groups), "grad_norm": grad_norm}
