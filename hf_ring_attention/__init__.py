"""hf_ring_attention: exact ring attention for Hugging Face transformers models."""

from .agreement import RingMismatchError
from .comm import RingCommError, RingOutOfStepError
from .groups import RingGroups, setup_groups
from .integration import apply_ring_attention, remove_ring_attention
from .perplexity import PerplexityResult, evaluate_perplexity
from .ring import RingOptions, ring_attention
from .sharding import IGNORE_INDEX, gather_sequence, shard_batch, shift_labels, zigzag_shard, zigzag_unshard
from .training import shard_window
from .ulysses import ulysses_attention

__all__ = [
    "IGNORE_INDEX", "PerplexityResult", "RingCommError", "RingGroups", "RingMismatchError", "RingOptions",
    "RingOutOfStepError", "apply_ring_attention", "evaluate_perplexity", "gather_sequence", "remove_ring_attention",
    "ring_attention", "setup_groups", "shard_batch", "shard_window", "shift_labels", "ulysses_attention",
    "zigzag_shard", "zigzag_unshard",
]
__version__ = "0.1.0"
