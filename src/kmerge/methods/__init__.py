"""Compression methods (kmerge, its variants and the baselines of the Pareto sweep) behind one
registry; the token-level ones also serve ``KMergeConfig.prompt_compressor`` (see ``base``)."""

from kmerge.methods import (  # noqa: F401  (each module registers its methods)
    dropping,
    llmlingua2,
    merging,
    meta_tokens,
    self_information,
)
from kmerge.methods.base import (
    METHODS,
    Method,
    PromptCompressor,
    TokenSelector,
    check_compressor,
    check_ratio,
    get_compressor,
    get_method,
    kept_count,
    register_method,
)
from kmerge.methods.meta_tokens import meta_decode, meta_encode
from kmerge.methods.self_information import token_surprisal

__all__ = [
    "METHODS",
    "Method",
    "PromptCompressor",
    "TokenSelector",
    "check_compressor",
    "check_ratio",
    "get_method",
    "get_compressor",
    "kept_count",
    "meta_decode",
    "meta_encode",
    "register_method",
    "token_surprisal",
]
