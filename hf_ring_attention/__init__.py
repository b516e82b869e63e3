"""hf_ring_attention: exact ring attention for Hugging Face Llama / Mistral models."""

from .groups import RingGroups, setup_groups
from .integration import apply_ring_attention, remove_ring_attention
from .perplexity import PerplexityResult, evaluate_perplexity
from .ring import ring_attention
from .sharding import IGNORE_INDEX, global_loss_tokens, shard_batch, shift_labels, zigzag_shard, zigzag_unshard

__all__ = [
    "IGNORE_INDEX", "PerplexityResult", "RingCache", "RingGroups", "evaluate_perplexity", "apply_ring_attention", "global_loss_tokens", "remove_ring_attention",
    "ring_attention", "ring_generate", "setup_groups", "shard_batch", "shift_labels", "zigzag_shard", "zigzag_unshard",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # generation subclasses transformers' Cache: import it (and transformers, ~1.4 s) on first use only.
    if name in ("RingCache", "ring_generate"):
        from . import generation

        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
