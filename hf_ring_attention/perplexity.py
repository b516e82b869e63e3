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

from .integration import patched_ring_size
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
    patched = patched_ring_size(model)
    if ring_size > 1 and patched is None:
        raise ValueError(f"ring_size={ring_size} but the model uses attention {config._attn_implementation!r}: "
                         "call hf_ring_attention.apply_ring_attention(model, groups) first")
    if patched is not None and patched != ring_size:
        raise ValueError(f"the model is patched for {patched} processes per sequence but groups has "
                         f"sp_size={ring_size}; pass the groups used in apply_ring_attention(model, groups)")
    return decoder, lm_head


@contextmanager
def _fresh_dynamic_rope(decoder: torch.nn.Module) -> Iterator[None]:
    """Score every window as a freshly loaded model would, whatever was evaluated before.

    ``dynamic`` RoPE keeps the frequencies of the longest length it has seen; a pre-hook on its
    rotary modules restores the original ones before every forward, so results do not depend on the
    order of ``context_lengths`` or on earlier calls. (On a ring, the patch itself makes dynamic RoPE
    see the whole window's largest position.)
    """
    modules = [m for m in decoder.modules() if isinstance(getattr(m, "rope_type", None), str)
               and "dynamic" in m.rope_type and hasattr(m, "original_inv_freq") and hasattr(m, "original_max_seq_len")]

    def pre(module, args, kwargs):
        module.register_buffer("inv_freq", module.original_inv_freq.to(module.inv_freq.device).clone(),
                               persistent=False)
        module.max_seq_len_cached = module.original_max_seq_len

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _window_nll(decoder: torch.nn.Module, lm_head: torch.nn.Module, batch: dict,
                chunk_size: int) -> tuple[torch.Tensor, int]:
    """Sum of NLL (fp64) and count of this rank's scored targets in one sharded window."""
    hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     ring_layout=batch["ring_layout"], ring_documents=batch["ring_documents"],
                     ).last_hidden_state  # (1, S_local, H)
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
    ring = 1 if groups is None else groups.sp_size
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
    try:
        with _fresh_dynamic_rope(decoder):
            for i, (context, plan) in enumerate(zip(context_lengths, plans)):
                mine = plan[dp_rank::dp_size]
                bar = tqdm(mine, desc=f"perplexity L={context}", unit="window",
                           disable=not (progress and main), leave=False)
                for start, first in bar:
                    window = token_ids[start:start + context].to(device)[None]  # (1, L)
                    labels = window.clone()
                    labels[:, :first] = IGNORE_INDEX  # targets before `first` are not scored
                    # The divisor is unused (NLL sums are reduced below); giving it keeps shard_batch from
                    # asking for a data-parallel count.
                    batch = shard_batch({"input_ids": window, "labels": labels}, groups, num_items_in_batch=1.0)
                    nll, count = _window_nll(decoder, lm_head, batch, chunk_size)
                    sums[i, 0] += nll
                    sums[i, 1] += count
    finally:
        model.train(was_training)
    if groups is not None and groups.world_size > 1:
        dist.all_reduce(sums)  # over every rank: the ring's shards and the data-parallel rings' windows
    results = []
    for context, plan, (nll, tokens) in zip(context_lengths, plans, sums.tolist()):
        tokens = int(round(tokens))
        ppl = math.exp(nll / tokens) if tokens else float("nan")
        results.append(PerplexityResult(context, tokens, nll, ppl, len(plan), stride or context))
    return results
