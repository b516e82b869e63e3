"""hf_ring_attention: exact ring attention for Hugging Face transformers models."""

from .agreement import RingMismatchError
from .comm import RingCommError, RingOutOfStepError
from .groups import RingGroups, setup_groups
from .integration import apply_ring_attention, remove_ring_attention
from .loss import chunked_causal_lm_loss
from .perplexity import PerplexityResult, evaluate_perplexity
from .ring import RingOptions, ring_attention
from .sharding import IGNORE_INDEX, gather_sequence, shard_batch, shift_labels, zigzag_shard, zigzag_unshard
from .training import shard_window
from .ulysses import ulysses_attention

__all__ = [
    "IGNORE_INDEX", "PerplexityResult", "RingCache", "RingCommError", "RingGroups", "RingMismatchError",
    "RingOptions", "RingOutOfStepError", "RingTrainer", "apply_ring_attention", "chunked_causal_lm_loss",
    "evaluate_perplexity", "gather_sequence", "remove_ring_attention", "ring_attention", "ring_generate",
    "setup_groups", "shard_batch", "shard_window", "shift_labels", "ulysses_attention", "zigzag_shard",
    "zigzag_unshard",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainers import transformers' Trainer (RingSFTTrainer: TRL) only when asked for;
    # RingSFTTrainer stays out of __all__ so that a star import does not need TRL.
    if name in ("RingTrainer", "RingSFTTrainer", "RingTrainerMixin"):
        from . import trainer

        return getattr(trainer, name)
    # generation subclasses transformers' Cache: import it (and transformers, ~1.4 s) on first use only.
    if name in ("RingCache", "ring_generate"):
        from . import generation

        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
