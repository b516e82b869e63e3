"""hf_ring_attention: exact ring attention for Hugging Face Llama / Mistral models."""

from .ring import ring_attention
from .sharding import zigzag_shard, zigzag_unshard

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard"]
__version__ = "0.1.0"
