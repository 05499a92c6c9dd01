"""kmerge: K-Token Merging, latent-space prompt compression for decoder-only LLMs."""

import warnings

from kmerge.batching import CompressedBatch, compress_batch, make_blocks
from kmerge.encoder import MergeEncoder
from kmerge.errors import KMergeConfigError, KMergeDataError, KMergeError
from kmerge.modeling import KMergeConfig, KMergeModel, KMergeOutput
from kmerge.models import DEFAULT_MODEL, load_base_model

__version__ = "0.1.0"

# peft reads a deprecated transformers attribute on every forward pass; the warning is theirs
# to fix and says nothing about the user's code, so keep it out of training logs.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__all__ = [
    "DEFAULT_MODEL",
    "CompressedBatch",
    "KMergeConfig",
    "KMergeConfigError",
    "KMergeDataError",
    "KMergeError",
    "KMergeModel",
    "KMergeOutput",
    "MergeEncoder",
    "compress_batch",
    "load_base_model",
    "make_blocks",
]
