"""Prompt-compression methods for the Pareto sweep, behind one registry (see ``base``)."""

from kmerge.baselines import (  # noqa: F401  (each module registers its methods)
    dropping,
    llmlingua2,
    merging,
    meta_tokens,
    self_information,
)
from kmerge.baselines.base import (
    BASELINES,
    Method,
    PromptCompressor,
    TokenSelector,
    check_ratio,
    get_baseline,
    get_compressor,
    kept_count,
    register_baseline,
)
from kmerge.baselines.meta_tokens import meta_decode, meta_encode
from kmerge.baselines.self_information import token_surprisal

__all__ = [
    "BASELINES",
    "Method",
    "PromptCompressor",
    "TokenSelector",
    "check_ratio",
    "get_baseline",
    "get_compressor",
    "kept_count",
    "meta_decode",
    "meta_encode",
    "register_baseline",
    "token_surprisal",
]
