"""Perplexity of a causal LM at several context lengths, each window sharded over the ring.

For a context length L the token stream is cut into windows of L tokens. By default the
windows do not overlap and every target of a window is scored (its first token has no
context inside the window, so L - 1 per window). With ``stride`` the windows slide by
``stride`` tokens and only the targets among each window's last ``stride`` tokens are
scored, so every scored token sees at least L - stride tokens of context; the first
window scores all its targets (the sliding-window method of
https://huggingface.co/docs/transformers/perplexity). Positions restart at 0 in every
window. Windows always hold exactly L tokens; the tail of the stream that does not fill
one more window is not scored.

Each window is zigzag-sharded with ``shard_batch`` (padding with ignored targets), the
base model returns this rank's hidden states, and the LM head + cross-entropy run over
chunks of rows, so full-vocabulary logits of a whole window never exist at once. NLL sums
and scored-token counts are summed over the ring (and over data-parallel rings, which take
windows ``dp_rank::dp_size``): perplexity = exp(total NLL / total tokens), token-weighted.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .integration import ATTN_KEY, _STATE_ATTR
from .loss import chunked_causal_lm_loss
from .sharding import IGNORE_INDEX, shard_batch

# Config attributes that change logits after the LM head; the chunked head here would
# silently skip them. name -> value meaning "off".
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                     "output_multiplier_scale": 1.0}


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity at one context length.

    Attributes:
        context_length: window length L in tokens.
        tokens: number of scored target tokens (summed over ranks and windows).
        nll: sum of the negative log-likelihoods (nats) of the scored tokens.
        perplexity: exp(nll / tokens).
        windows: number of windows evaluated (over all data-parallel rings).
        stride: tokens the window advances by (L when windows do not overlap).
    """

    context_length: int
    tokens: int
    nll: float
    perplexity: float
    windows: int
    stride: int


def window_plan(num_tokens: int, context_length: int, *, stride: int | None = None,
                max_windows: int | None = None) -> list[tuple[int, int]]:
    """Windows of one context length over a stream of ``num_tokens`` tokens.

    Args:
        num_tokens: length of the token stream.
        context_length: window length L.
        stride: tokens between window starts (default L: no overlap).
        max_windows: keep only the first this many windows.

    Returns:
        ``(start, first_scored)`` per window: the window is ``tokens[start:start + L]`` and
        targets at window positions ``>= first_scored`` are scored.

    Raises:
        ValueError: L < 2, L longer than the stream, stride outside [1, L], max_windows < 1.
    """
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context length {context_length!r} must be an int >= 2 (a window scores L - 1 "
                         "next-token targets); pass positive lengths such as 1024,2048")
    if context_length > num_tokens:
        raise ValueError(f"context length {context_length} is longer than the text ({num_tokens} tokens); "
                         "use a longer text or drop that length")
    step = context_length if stride is None else stride
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"stride={stride!r} must be a positive int; leave it unset for non-overlapping windows")
    if step > context_length:
        raise ValueError(f"stride={step} is larger than context length {context_length}: tokens between "
                         f"windows would never be scored; use stride <= {context_length}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r} must be a positive int (or None for all windows)")
    count = (num_tokens - context_length) // step + 1
    if max_windows is not None:
        count = min(count, max_windows)
    return [(k * step, 1 if k == 0 else max(1, context_length - step)) for k in range(count)]


def _check_model(model: torch.nn.Module, ring_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return (decoder, lm_head) of a causal LM whose logits are just ``lm_head(hidden)``."""
    get_head = getattr(model, "get_output_embeddings", None)
    lm_head = get_head() if get_head is not None else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if lm_head is None or decoder is None or decoder is model:
        raise NotImplementedError(f"{type(model).__name__} is not a *ForCausalLM model with a decoder and an "
                                  "LM head (get_decoder() / get_output_embeddings()); load it with "
                                  "AutoModelForCausalLM")
    config = model.config
    for name, off in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != off:
            raise NotImplementedError(f"config.{name}={value!r} transforms the logits after the LM head, which the "
                                      "chunked perplexity does not reproduce; evaluate this model another way")
    state = getattr(model, _STATE_ATTR, None) if config._attn_implementation == ATTN_KEY else None
    if ring_size > 1 and state is None:
        raise ValueError(f"ring_size={ring_size} but the model uses attention {config._attn_implementation!r}: "
                         "call hf_ring_attention.apply_ring_attention(model, groups) first")
    if state is not None and state.world_size != ring_size:
        raise ValueError(f"the model is patched for a ring of {state.world_size} processes but groups has "
                         f"ring_size={ring_size}; pass the groups used in apply_ring_attention(model, groups)")
    return decoder, lm_head


@contextmanager
def _rope_sees_window_length(decoder: torch.nn.Module, length: list[int]) -> Iterator[None]:
    """Make dynamic RoPE (``dynamic``, ``longrope``) pick its frequencies from the window length.

    Transformers' ``dynamic_rope_update`` sets seq_len = max(position_ids) + 1 of the tensor it
    gets. A zigzag shard holds different positions on each rank, and padding adds positions past
    the window, so each rank would pick different frequencies than the unsharded model. Hooks on
    the rotary module append the window's last position and clip padding positions to it, so
    every rank sees seq_len = L, then drop the extra column. Padding tokens get clipped
    positions; their targets are ignored and, causally, no real token attends them.

    ``dynamic`` RoPE also keeps the frequencies of the longest length it has seen; the pre-hook
    resets that state, so every window is scored as by a freshly loaded model and results do
    not depend on the order of ``context_lengths`` or on earlier calls.
    """
    modules = []
    for m in decoder.modules():
        kind = getattr(m, "rope_type", None)
        kinds = kind.values() if isinstance(kind, dict) else [kind]
        if hasattr(m, "inv_freq") and any(isinstance(k, str) and ("dynamic" in k or k == "longrope")
                                          for k in kinds):
            modules.append(m)

    def pre(module, args, kwargs):
        if isinstance(module.rope_type, str) and "dynamic" in module.rope_type \
                and hasattr(module, "original_inv_freq") and hasattr(module, "original_max_seq_len"):
            module.register_buffer("inv_freq", module.original_inv_freq.to(module.inv_freq.device).clone(),
                                   persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len
        pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]  # (B, S_local)
        last = length[0] - 1
        pos = torch.cat([pos.clamp(max=last), pos.new_full((pos.shape[0], 1), last)], dim=1)
        if "position_ids" in kwargs:
            return args, {**kwargs, "position_ids": pos}
        return (args[0], pos, *args[2:]), kwargs

    def post(module, args, kwargs, output):
        return tuple(o[:, :-1] for o in output)  # (cos, sin): (B, S_local, D)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                            m.register_forward_hook(post, with_kwargs=True))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _clear_document_cache(model: torch.nn.Module) -> None:
    """Forget the ring's cached document bounds, on every rank at the same point.

    ``RingState.document_bounds`` keys its cache on the position tensor's address. A new
    tensor can reuse a freed one's address (same shape, version 0): a rank that then hits the
    stale entry skips the all-gather its ring peers make, and the collectives fall out of step
    (gloo aborts: "op.preamble.length <= op.nbytes. 32 vs 20"). Within one call the position
    tensors stay alive, so only entries from before the call can be stale, and none after it.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is not None and hasattr(state, "_docs_cache"):
        state._docs_cache = (None, None)


def _window_nll(decoder: torch.nn.Module, lm_head: torch.nn.Module, batch: dict,
                chunk_size: int) -> tuple[torch.Tensor, int]:
    """Sum of NLL (fp64) and count of this rank's scored targets in one sharded window."""
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     use_cache=False).last_hidden_state  # (1, S_local, H)
    targets = batch["shift_labels"]  # (1, S_local)
    # The training loss's chunked LM head + cross-entropy; a divisor of 1 leaves the sum.
    nll = chunked_causal_lm_loss(hidden, lm_head.weight, targets, bias=lm_head.bias, num_items_in_batch=1,
                                 chunk_size=chunk_size)
    return nll.double(), int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, token_ids: torch.Tensor, context_lengths: Sequence[int], *,
                        groups=None, stride: int | None = None, max_windows: int | None = None,
                        chunk_size: int = 1024, progress: bool = True) -> list[PerplexityResult]:
    """Token-weighted perplexity of ``model`` on ``token_ids`` at each context length.

    Every rank of a ring must call this with the same arguments (it is collective over the
    ring and data-parallel groups). The model is put in eval mode for the call.

    Args:
        model: a ``*ForCausalLM`` transformers model, patched with ``apply_ring_attention(model,
            groups)`` when ``groups.ring_size > 1``.
        token_ids: the token stream, a 1-D integer tensor (N,) (same on every rank).
        context_lengths: window lengths L to evaluate, in order.
        groups: ``RingGroups`` from ``setup_groups`` (default: one process, no sharding).
        stride: slide windows by this many tokens and score only their last ``stride`` tokens
            (default: non-overlapping windows, all targets scored).
        max_windows: evaluate at most this many windows per length (the first ones), in total
            over all data-parallel rings.
        chunk_size: rows of hidden states per LM-head + cross-entropy chunk (bounds the
            (chunk_size, vocab) fp32 logits buffer).
        progress: show a tqdm bar on global rank 0.

    Returns:
        One ``PerplexityResult`` per context length, identical on every rank.

    Raises:
        ValueError: bad token stream, lengths, stride or max_windows; token ids outside the
            vocabulary; ring_size > 1 on a model not patched for that ring.
        NotImplementedError: not a causal LM with an LM head, or logits transformed after the
            head (e.g. ``final_logit_softcapping``).
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.is_floating_point():
        raise ValueError("token_ids must be a 1-D integer tensor (the tokenized text as one stream); got "
                         f"{type(token_ids).__name__} of shape {tuple(getattr(token_ids, 'shape', ()))}")
    if isinstance(context_lengths, int) or len(context_lengths) == 0:
        raise ValueError(f"context_lengths={context_lengths!r} must be a non-empty list of ints, e.g. [1024, 2048]")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    ring = 1 if groups is None else groups.ring_size
    dp_rank, dp_size = (0, 1) if groups is None else (groups.dp_rank, groups.dp_size)
    plans = [window_plan(token_ids.numel(), length, stride=stride, max_windows=max_windows)
             for length in context_lengths]
    decoder, lm_head = _check_model(model, ring)
    vocab = lm_head.weight.shape[0]
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocabulary); got "
                         f"[{int(token_ids.min())}, {int(token_ids.max())}]: was the text tokenized with this "
                         "model's tokenizer?")
    device = lm_head.weight.device
    main = not dist.is_initialized() or dist.get_rank() == 0
    sums = torch.zeros(len(plans), 2, dtype=torch.float64, device=device)  # (lengths, [nll, tokens])
    was_training = model.training
    model.eval()
    length = [0]  # read by the RoPE hooks
    alive: list[torch.Tensor] = []  # the sharded position_ids of each length (see _clear_document_cache)
    _clear_document_cache(model)
    try:
        with _rope_sees_window_length(decoder, length):
            for i, (context, plan) in enumerate(zip(context_lengths, plans)):
                length[0] = context
                mine = plan[dp_rank::dp_size]
                bar = tqdm(mine, desc=f"perplexity L={context}", unit="window",
                           disable=not (progress and main), leave=False)
                shared_pos = None
                for start, first in bar:
                    window = token_ids[start:start + context].to(device)[None]  # (1, L)
                    labels = window.clone()
                    labels[:, :first] = IGNORE_INDEX  # targets before `first` are not scored
                    # num_items_in_batch given: shard_batch would otherwise all-reduce over dp,
                    # a collective that rings with fewer windows would never join.
                    batch = shard_batch({"input_ids": window, "labels": labels}, groups, num_items_in_batch=1.0)
                    # Every window of this length has the same positions: passing one tensor object lets
                    # the ring's document detection (cached per position tensor) skip its all-gather.
                    if shared_pos is None:
                        shared_pos = batch["position_ids"]
                        alive.append(shared_pos)  # no later tensor may reuse its address in this call
                    batch["position_ids"] = shared_pos
                    nll, count = _window_nll(decoder, lm_head, batch, chunk_size)
                    sums[i, 0] += nll
                    sums[i, 1] += count
    finally:
        model.train(was_training)
        _clear_document_cache(model)
    if groups is not None and dist.is_initialized():
        if groups.ring_size > 1:
            dist.all_reduce(sums, group=groups.ring_group)
        if groups.dp_size > 1:
            dist.all_reduce(sums, group=groups.dp_group)
    results = []
    for context, plan, (nll, tokens) in zip(context_lengths, plans, sums.tolist()):
        tokens = int(round(tokens))
        ppl = math.exp(nll / tokens) if tokens else float("nan")
        results.append(PerplexityResult(context, tokens, nll, ppl, len(plan), stride or context))
    return results
