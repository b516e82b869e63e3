"""hf_ring_attention: exact ring attention for Hugging Face Llama / Mistral models."""

from .groups import RingGroups, setup_groups
from .integration import apply_ring_attention, remove_ring_attention
from .loss import chunked_causal_lm_loss
from .perplexity import PerplexityResult, evaluate_perplexity
from .ring import ring_attention
from .sharding import IGNORE_INDEX, global_loss_tokens, shard_batch, shift_labels, zigzag_shard, zigzag_unshard

__all__ = [
    "IGNORE_INDEX", "PerplexityResult", "RingGroups", "chunked_causal_lm_loss", "evaluate_perplexity", "apply_ring_attention", "global_loss_tokens", "remove_ring_attention",
    "ring_attention", "setup_groups", "shard_batch", "shift_labels", "zigzag_shard", "zigzag_unshard",
]
__version__ = "0.1.0"
