"""Generation over the ring: sharded prefill, a sharded KV cache behind ``generate``, decode merge.

``ring_generate(model, input_ids, groups, **generate_kwargs)`` runs transformers' own
``model.generate`` (GenerationConfig, logits processors, stopping criteria, eos), with three
things added for the call and removed after it:

* **Prefill.** A forward pre-hook replaces the prompt by this rank's zigzag shard
  (``shard_batch``: padded to a multiple of 2C), so the patched model runs exact ring
  attention. Each layer of a ``RingCache`` keeps the shard's K/V, padding dropped: cache
  memory per rank is O(N / C).
* **Decode.** Every rank runs the new token through the model (replicated: a token's
  FLOPs are small). In each attention layer its query attends to this rank's cache shard,
  masked by global positions (causal, sliding window), giving ``(out, lse)`` from the block
  kernel; one all-gather of ``(out, lse)`` and the LSE merge in rank order give the exact
  attention on every rank (flash-decoding across ranks: Dao et al. 2023, "Flash-Decoding
  for long-context inference"). The new token's K/V is stored on one rank only, rank
  ``position mod C`` (round robin), so the cache stays balanced.
* **Logits.** A forward hook broadcasts the last position's logits from the rank that
  computed them (prefill: the rank whose shard holds the prompt's last token; decode: ring
  rank 0), so every rank's logits processors and sampler see identical numbers and pick
  identical tokens (sampling too: ``ring_generate`` checks that the ranks' RNG states agree).

Why hooks and not a decode loop: ``generate`` keeps owning everything a loop would re-implement
(generation config, processors, stopping criteria, eos and padding of finished rows, output
classes); the hooks only change what one forward sees and returns.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, DynamicLayer

from .integration import _STATE_ATTR, RingForward, apply_ring_attention, patched_ring_size, remove_ring_attention
from .kernels import merge_, select_kernel
from .sharding import shard_batch, sp_shard_index

# generate() arguments that are not generation-config fields and that ring_generate passes on.
_PASSED_ON = ("attention_mask", "logits_processor", "stopping_criteria", "streamer", "prefix_allowed_tokens_fn")


class RingCacheLayer(DynamicLayer):
    """One layer's K/V of this rank's tokens: (B, Hkv, S_rank, D), global positions in the parent cache.

    ``update`` follows the parent's plan for the current forward: at prefill it keeps the
    shard's rows that are prompt tokens (not padding) and returns the whole shard (the ring
    attends over it); at decode it appends the new tokens if this rank owns them and
    returns the rank's cache shard (the decode attention attends over it).
    """

    def __init__(self, parent: "RingCache"):
        super().__init__()
        self.parent = parent

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.parent.plan
        if plan is None:
            raise RuntimeError("RingCache used outside ring_generate (no plan for this forward); it shards a "
                               "prompt over the ring only through hf_ring_attention.ring_generate")
        if plan.prefill:
            self.keys = key_states.index_select(2, plan.keep.to(key_states.device))
            self.values = value_states.index_select(2, plan.keep.to(value_states.device))
            return key_states, value_states  # the whole shard: the ring attends over padding-free causal blocks
        if plan.store:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.parent.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.seen + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a ring-sharded cache cannot be cropped (assisted decoding, DoLa and deferred "
                                  "stop checks are not supported by ring_generate)")


@dataclass(frozen=True)
class _Plan:
    prefill: bool
    keep: torch.Tensor | None = None  # prefill: local rows that are prompt tokens
    store: bool = False  # decode: this rank stores the new tokens


class RingCache(Cache):
    """A transformers ``Cache`` holding this rank's shard of the K/V of every layer.

    ``get_seq_length()`` is the GLOBAL number of tokens seen (what ``generate`` and the masks
    expect); ``positions`` (S_rank,) are the global positions of the tokens this rank holds,
    the same for every layer. ``ring_sharded`` marks it for ``apply_ring_attention``'s checks.

    Args:
        num_layers: decoder layers of the model.
    """

    ring_sharded = True

    def __init__(self, num_layers: int):
        super().__init__(layers=[RingCacheLayer(self) for _ in range(num_layers)])
        self.seen = 0
        self.positions = torch.empty(0, dtype=torch.long)
        self.plan: _Plan | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_croppable(self) -> bool:
        return False

    def begin_prefill(self, positions: torch.Tensor, keep: torch.Tensor) -> None:
        """Plan the prefill: keep local rows ``keep`` (global ``positions``: the prompt tokens)."""
        self.positions = positions
        self.plan = _Plan(prefill=True, keep=keep)

    def begin_decode(self, positions: torch.Tensor, store: bool) -> None:
        """Plan one decode forward over new tokens at global ``positions``; ``store`` on their owner."""
        if store:
            self.positions = torch.cat([self.positions, positions.to(self.positions.device)])
        self.plan = _Plan(prefill=False, store=store)

    def end_forward(self, new_tokens: int) -> None:
        self.seen += new_tokens
        self.plan = None

    def nbytes(self) -> int:
        """Bytes of K/V this rank holds, over all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)


class DecodeAttention:
    """The attention of new tokens against the ring's sharded cache (passed to attention as ``ring_decode``).

    Args:
        cache: this rank's ``RingCache`` (its ``positions`` say where the shard's keys sit).
        positions: (Sq,) global positions of the new tokens (the same for every batch row).
        group, ring_size: the ring; each attention call does one all-gather over it.
        kernel: block kernel name (None: chosen per device and dtype).
    """

    def __init__(self, cache: RingCache, positions: torch.Tensor, group, ring_size: int, kernel: str | None):
        self.cache, self.positions, self.group, self.ring_size, self.kernel = cache, positions, group, ring_size, kernel

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float | None,
                  sliding_window: int | None) -> torch.Tensor:
        """query (B, Hq, Sq, D); key/value this rank's shard (B, Hkv, S_rank, D) -> out (B, Sq, Hq, D).

        Talks to the ring: one all-gather of (out, lse) per call, on every rank of the ring.
        """
        b, hq, sq, d = query.shape
        acc = torch.promote_types(query.dtype, torch.float32)
        scale = d ** -0.5 if scaling is None else scaling
        kpos = self.cache.positions.to(query.device)  # (S_rank,)
        qpos = self.positions.to(query.device)  # (Sq,)
        allowed = kpos[None, :] <= qpos[:, None]  # (Sq, S_rank): causal over global positions
        if sliding_window is not None:
            allowed &= qpos[:, None] - kpos[None, :] < sliding_window  # transformers: kv_idx > q_idx - W
        if key.shape[2] == 0 or not bool(allowed.any()):
            out = torch.zeros(query.shape, dtype=acc, device=query.device)
            lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=query.device)
        else:
            kernel = select_kernel(query, self.kernel)
            out, lse = kernel.forward(query, key, value, scale=scale, causal=False,
                                      mask=None if bool(allowed.all()) else allowed)
        part = torch.cat([out.to(acc), lse.to(acc).unsqueeze(-1)], dim=-1)  # (B, Hq, Sq, D + 1): one message
        parts = [part]
        if self.ring_size > 1:
            parts = [torch.empty_like(part) for _ in range(self.ring_size)]
            dist.all_gather(parts, part, group=self.group)
        res = torch.zeros(query.shape, dtype=acc, device=query.device)
        res_lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=query.device)
        for p in parts:  # rank order on every rank: bitwise the same result everywhere
            merge_(res, res_lse, p[..., :d], p[..., d])
        return res.to(query.dtype).transpose(1, 2).contiguous()


class _Hooks:
    """The forward pre-hook and hook that shard the prefill, plan the cache and share the logits."""

    def __init__(self, cache: RingCache, groups, state, pad_token_id: int):
        self.cache, self.groups, self.state, self.pad = cache, groups, state, pad_token_id
        self.size = 1 if groups is None else groups.sp_size
        self.rank = 0 if groups is None else groups.sp_rank
        self.group = None if groups is None else groups.sp_group
        self.src, self.row, self.new = 0, None, 0

    def pre(self, module, args, kwargs):
        if args or kwargs.get("cache") is not self.cache:
            raise RuntimeError("ring_generate's hooks expect generate() to call the model with keyword arguments "
                               "and the RingCache; call the model through ring_generate only")
        ids, pos = kwargs["input_ids"], kwargs.get("position_ids")  # (B, S), (1 or B, S)
        start, s = self.cache.seen, ids.shape[1]
        expect = torch.arange(start, start + s, device=ids.device)
        if pos is None or pos.shape[-1] != s or not bool((pos == expect).all()):
            raise RuntimeError(f"ring_generate expects position_ids {start}..{start + s - 1} for every row from "
                               "generate(); prompts must be equal-length and unpadded")
        self.new = s
        if start == 0:  # the patched model's own pre-hook then agrees on the shards and runs the ring
            return args, self._prefill(kwargs, ids, s)
        owner = start % self.size  # round robin by position: the cache grows evenly on every rank
        self.cache.begin_decode(expect, store=self.rank == owner)
        self.src, self.row = 0, None
        kwargs["ring_decode"] = DecodeAttention(self.cache, expect, self.group, self.size, self.state.kernel)
        # A ring_context tells the patch's pre-hook that this forward is settled (nothing to shard or
        # agree on: every rank runs the same token); the patch's dynamic-RoPE hooks read max_position.
        ctx = RingForward("zigzag", (None,) * ids.shape[0], start + s, start + s - 1)
        self.state.forward = kwargs["ring_context"] = ctx
        return args, kwargs

    def _prefill(self, kwargs, ids, n):
        shard = shard_batch({"input_ids": ids}, self.groups, pad_token_id=self.pad)
        s_local = shard["input_ids"].shape[1]
        u = 1 if self.groups is None else self.groups.ulysses_size
        index = sp_shard_index("zigzag", self.rank, self.size, s_local, ulysses_size=u).to(ids.device)  # (S_local,)
        keep = torch.nonzero(index < n).flatten()  # padding rows are dropped from the cache
        self.cache.begin_prefill(index.index_select(0, keep), keep)
        # The sp rank holding the prompt's last token (index n - 1), and its row there: every rank
        # computes the same answer from the layout, without communication.
        for r in range(self.size):
            hit = torch.nonzero(sp_shard_index("zigzag", r, self.size, s_local, ulysses_size=u) == n - 1)
            if hit.numel():
                self.src = r
                self.row = int(hit[0, 0]) if self.rank == r else 0
                break
        kwargs.update(shard)
        if "logits_to_keep" in kwargs:  # only the one row whose logits generate reads
            kwargs["logits_to_keep"] = torch.tensor([self.row], device=ids.device)
        return kwargs

    def post(self, module, args, kwargs, output):
        logits = output.logits  # (B, S, V): S == 1 with logits_to_keep
        if logits.shape[1] != 1:
            logits = logits[:, -1:] if self.row is None else logits[:, self.row:self.row + 1]
        logits = logits.contiguous()
        if self.size > 1:
            src = self.src if self.group is None else dist.get_global_rank(self.group, self.src)
            dist.broadcast(logits, src=src, group=self.group)
        output.logits = logits
        self.cache.end_forward(self.new)
        return output


def ring_generate(model: torch.nn.Module, input_ids: torch.Tensor, groups=None, **generate_kwargs):
    """``model.generate`` with the prompt sharded over a ring and the KV cache sharded with it.

    Every rank of the ring calls this with the same arguments (it is collective over the ring)
    and gets the same result. Prefill runs exact zigzag ring attention; decoding attends to
    every rank's cache shard and merges the partial results (see the module docstring).

    Args:
        model: a transformers ``*ForCausalLM`` (Llama, Mistral, ...), plain or patched with
            ``apply_ring_attention(model, groups)``; its state is restored afterwards.
        input_ids: (B, N) the full prompts, the same on every rank; equal lengths, no padding.
        groups: ``RingGroups`` from ``setup_groups`` (default: one process, ring of 1).
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``,
            ``generation_config``, ``return_dict_in_generate``, ``output_scores``, ...). With
            ``do_sample=True`` seed every rank the same (``torch.manual_seed``) first.

    Returns:
        What ``model.generate`` returns: the sequences (B, N + new), or a
        ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``.

    Raises:
        ValueError: padded prompts (an attention_mask with zeros), prompts or generation
            arguments that differ across the ranks (or RNG states, when sampling), a cache
            passed in, ``use_cache=False``, a model patched for another ring.
        NotImplementedError: beam search, assisted decoding, chunked prefill, ``max_time``,
            attentions / hidden states in the output, encoder-decoder models.
        Every rank raises the same error: the arguments are checked on every rank, then
        agreed with one all-gather, before any other communication.
    """
    size = 1 if groups is None else groups.sp_size
    group = None if groups is None else groups.sp_group
    error = _check_local(model, input_ids, groups, generate_kwargs)
    _agree(error, input_ids, generate_kwargs, model, group, size)

    patched = patched_ring_size(model) is not None
    if not patched:
        apply_ring_attention(model, groups)
    state = getattr(model, _STATE_ATTR)
    text_config = model.config.get_text_config(decoder=True)
    cache = RingCache(text_config.num_hidden_layers)
    pad = getattr(text_config, "pad_token_id", None)
    hooks = _Hooks(cache, groups, state, 0 if pad is None else int(pad))
    handles = [model.register_forward_pre_hook(hooks.pre, with_kwargs=True, prepend=True),
               model.register_forward_hook(hooks.post, with_kwargs=True)]
    if generate_kwargs.get("attention_mask") is None:  # prompts are unpadded: generate must not infer padding
        generate_kwargs["attention_mask"] = torch.ones_like(input_ids)  # from pad tokens inside a prompt
    try:
        return model.generate(input_ids, cache=cache, use_cache=True, **generate_kwargs)
    finally:
        state.forward = None
        for h in handles:
            h.remove()
        if not patched:
            remove_ring_attention(model)


def _effective_config(model, kwargs: dict):
    """(GenerationConfig after generate's kwargs, the other kwargs): what generate would use."""
    base = kwargs.get("generation_config") or model.generation_config
    config = copy.deepcopy(base)
    rest = config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return config, rest


def _check_local(model, input_ids, groups, kwargs) -> Exception | None:
    """This rank's view of the arguments: the exception to raise (on every rank), or None."""
    try:
        if not hasattr(model, "generate") or not hasattr(model, "get_decoder"):
            return NotImplementedError(f"{type(model).__name__} is not a transformers *ForCausalLM model")
        if getattr(model.config, "is_encoder_decoder", False):
            return NotImplementedError("ring_generate supports decoder-only models; this one is encoder-decoder")
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point() \
                or input_ids.numel() == 0:
            return ValueError("input_ids must be a non-empty (batch, seq) integer tensor, the full prompts on every "
                              f"rank; got {type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
        if groups is None and dist.is_initialized() and dist.get_world_size() > 1:
            return ValueError("ring_generate(groups=None) runs one process, but torch.distributed has "
                              f"{dist.get_world_size()} ranks: pass groups=hf_ring_attention.setup_groups(ring_size)")
        size = 1 if groups is None else groups.sp_size
        patched_size = patched_ring_size(model)
        if patched_size is not None and patched_size != size:
            return ValueError(f"the model is patched for a ring of {patched_size} but groups.ring_size is {size}; "
                              "pass the groups used in apply_ring_attention(model, groups)")
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                return ValueError(f"ring_generate builds its own sharded cache; do not pass {name}=")
        config, rest = _effective_config(model, kwargs)
        if config.use_cache is False:
            return ValueError("ring_generate decodes from a sharded KV cache; use_cache=False is not supported")
        refused = {  # field -> (set?, why not)
            "num_beams": ((config.num_beams or 1) > 1, "beam search over a sharded cache is not implemented"),
            "max_time": (config.max_time is not None, "a wall-clock stop would end the ranks at different steps"),
            "prefill_chunk_size": (getattr(config, "prefill_chunk_size", None) is not None,
                                   "the ring prefills the whole prompt at once"),
            "cache_implementation": (config.cache_implementation is not None, "ring_generate brings its own cache"),
            "prompt_lookup_num_tokens": (config.prompt_lookup_num_tokens is not None, "assisted decoding"),
            "assistant_model": (kwargs.get("assistant_model") is not None, "assisted decoding"),
            "custom_generate": (kwargs.get("custom_generate") is not None, "a custom decoding loop"),
            "output_attentions": (bool(config.output_attentions), "attention weights are never materialised"),
            "output_hidden_states": (bool(config.output_hidden_states), "hidden states are per-rank shards"),
        }
        bad = [f"{name} ({why})" for name, (on, why) in refused.items() if on]
        if bad:
            return NotImplementedError(f"ring_generate supports greedy and sampling decoding; not {', '.join(bad)}")
        unknown = sorted(set(rest) - set(_PASSED_ON))
        if unknown:
            return ValueError(f"ring_generate does not pass {unknown} to generate (it shards the prompt and its "
                              f"positions itself); it takes generation-config fields and {list(_PASSED_ON)}")
        mask = rest.get("attention_mask")
        if mask is not None and (tuple(mask.shape) != tuple(input_ids.shape) or not bool(mask.bool().all())):
            return ValueError("ring_generate needs equal-length prompts without padding, but attention_mask has zeros "
                              "(left padding?) or another shape; group prompts by length, or generate them one by one")
    except Exception as exc:  # noqa: BLE001 - an invalid generation config: every rank raises it together
        return exc
    return None


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _agree(error: Exception | None, input_ids, kwargs: dict, model, group, size: int) -> None:
    """Raise the same error on every rank of the ring, or return when all agree (one all_gather_object).

    Talks to the ring (when ``size > 1``): the first and only collective before generation starts.
    """
    sig = None
    if error is None:
        config, _ = _effective_config(model, kwargs)
        sig = {"input_ids": (tuple(input_ids.shape), str(input_ids.dtype), _digest(input_ids)),
               "generation": hashlib.sha1(config.to_json_string().encode()).hexdigest()[:16]}
        if config.do_sample:  # tokens are sampled on every rank: their generators must be in step
            device = next(model.parameters()).device
            state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
            sig["rng_state"] = _digest(state)
    mine = (None if error is None else (type(error).__name__, str(error)), sig)
    every = [mine]
    if size > 1:
        every = [None] * size
        dist.all_gather_object(every, mine, group=group)
    failed = [(r, e) for r, (e, _) in enumerate(every) if e is not None]
    if failed:
        kind, message = failed[0][1]
        cls = NotImplementedError if kind == "NotImplementedError" else ValueError
        ranks = [r for r, _ in failed]
        raise cls(message + (f" (ring ranks {ranks})" if size > 1 else ""))
    for key in every[0][1]:
        values = [s[key] for _, s in every]
        if len(set(values)) != 1:
            fix = {"input_ids": "pass the same prompts on every rank",
                   "generation": "pass the same generate arguments on every rank",
                   "rng_state": "seed every rank the same (torch.manual_seed) before sampling"}[key]
            raise ValueError(f"ring_generate: the ranks of the ring disagree on {key} (per rank: {values}); {fix}")
