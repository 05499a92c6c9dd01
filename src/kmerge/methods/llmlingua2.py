"""LLMLingua-2 (Pan et al. 2024) through the optional ``llmlingua`` package, offline only.

The compressor model is looked up locally, never downloaded: ``$KMERGE_LLMLINGUA2_MODEL`` (a
local directory) or the default model already in the Hugging Face cache. Without the package
or the model the method is unavailable and the sweep skips it with the reason.

LLMLingua-2 keeps words by its own classifier, counted in its own tokenizer's tokens, so the
prompt is decoded to text, compressed at rate ``1 / ratio`` and re-tokenised: the ratio it
reaches in the base model's tokens is close to the target but only ever reported as measured.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from kmerge.errors import KMergeConfigError
from kmerge.methods.base import PromptCompressor, register_method

if TYPE_CHECKING:
    from kmerge.modeling import KMergeModel

DEFAULT_LLMLINGUA2_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
MODEL_ENV = "KMERGE_LLMLINGUA2_MODEL"


def local_llmlingua2_model() -> tuple[str | None, str | None]:
    """(local model directory, None), or (None, why it is unavailable)."""
    if importlib.util.find_spec("llmlingua") is None:
        return None, "the llmlingua package is not installed (pip install llmlingua)"
    if os.environ.get(MODEL_ENV):
        path = os.environ[MODEL_ENV]
        if os.path.isdir(path):
            return path, None
        return None, f"${MODEL_ENV}={path} is not a directory"
    from huggingface_hub import snapshot_download

    try:  # local_files_only: look in the cache, never download
        return snapshot_download(DEFAULT_LLMLINGUA2_MODEL, local_files_only=True), None
    except Exception:  # huggingface_hub raises several kinds of "not cached"
        return None, (
            f"the LLMLingua-2 model is not available locally; put {DEFAULT_LLMLINGUA2_MODEL} "
            f"in the Hugging Face cache or point ${MODEL_ENV} at a local copy"
        )


@lru_cache(maxsize=1)
def _load(path: str):
    from llmlingua import PromptCompressor as LLMLingua

    return LLMLingua(path, use_llmlingua2=True, device_map="cpu")


@register_method("llmlingua2")
class LLMLingua2(PromptCompressor):
    """Keep the words LLMLingua-2's classifier rates most necessary, at rate 1 / ratio."""

    exact_ratio = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return local_llmlingua2_model()[1]

    def compress(
        self, prompt_ids: Sequence[Sequence[int]], model: KMergeModel | None = None
    ) -> list[list[int]]:
        if model is None:
            raise KMergeConfigError("llmlingua2 works on text: it needs the model's tokenizer")
        path, reason = local_llmlingua2_model()
        if path is None:
            raise KMergeConfigError(f"llmlingua2 is unavailable: {reason}")
        lingua, tok = _load(path), model.tokenizer
        out = []
        for ids in prompt_ids:
            text = tok.decode(list(ids))
            short = lingua.compress_prompt(text, rate=1 / self.ratio)["compressed_prompt"]
            # An empty result would be an empty prompt: keep the last token then.
            out.append(tok(short, add_special_tokens=False)["input_ids"] or list(ids)[-1:])
        return out
