"""Compression methods behind one registry: kmerge itself and the baselines it is compared with.

Every method turns a target compression ratio into the :class:`~kmerge.KMergeConfig` of the
model it trains and evaluates (:meth:`Method.model_options`), so the sweep runs all of them
with the same harness, data and budget. Two kinds:

* methods that change how prompt *embeddings* are merged (``kmerge``, ``mean_pool``, ``full``);
* :class:`PromptCompressor` methods that rewrite the prompt's *token ids* before the model
  sees them (truncation, token dropping, meta-tokens, LLMLingua-2). They run at K = 1, inside
  :meth:`KMergeModel.prepare`, so training, evaluation and generation see the same compressed
  prompt and the measured compression (prompt tokens / positions fed) needs no special case.

"Meets the target ratio exactly" means: a prompt of ``n`` tokens keeps ``ceil(n / ratio)``
positions, the same rule as kmerge's ``ceil(n / K)`` blocks, so both compress a given prompt to
the same length. Methods that cannot promise it say so (``exact_ratio = False``); their
ratio is only ever reported as measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, ClassVar

from kmerge.errors import KMergeConfigError
from kmerge.registry import Registry

if TYPE_CHECKING:
    from kmerge.modeling import KMergeModel


def check_ratio(ratio: object) -> float:
    """A target compression ratio: a finite number >= 1 (bools are rejected)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise KMergeConfigError(f"compression ratio must be a number >= 1, got {ratio!r}")
    if not math.isfinite(ratio) or ratio < 1:
        raise KMergeConfigError(f"compression ratio must be a number >= 1, got {ratio}")
    return ratio


def kept_count(n_tokens: int, ratio: float) -> int:
    """How many of ``n_tokens`` a method at ``ratio`` keeps: ``ceil(n / ratio)``.

    Computed on exact fractions (a ratio of 2.5 is 5/2), so float rounding never moves it.
    """
    return math.ceil(Fraction(n_tokens) / Fraction(str(ratio)))


class Method:
    """One method of the sweep at one target ratio. Subclasses set the class attributes."""

    name: ClassVar[str] = ""
    takes_ratio: ClassVar[bool] = True  # False: one point whatever the ratios (full, meta_tokens)
    exact_ratio: ClassVar[bool] = True  # True: ceil(n / ratio) positions per prompt, exactly
    tune_optional: ClassVar[bool] = False  # True: `--no-tune` evaluates it without LoRA-tuning
    # True: the task's question stays ordinary tokens (its query_pattern; see the sweep).
    protects_query: ClassVar[bool] = False

    def __init__(self, ratio: float | None = None, seed: int = 0) -> None:
        self.check_ratio_for(ratio)
        self.ratio = ratio if self.takes_ratio else None
        self.seed = seed

    @classmethod
    def check_ratio_for(cls, ratio: float | None) -> None:
        """Refuse a ratio this method cannot run at (none where it needs one, or not >= 1)."""
        if cls.takes_ratio:
            if ratio is None:
                raise KMergeConfigError(f"method {cls.name!r} needs a compression ratio")
            check_ratio(ratio)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this method cannot run here (a missing optional package or model), or None."""
        return None

    def model_options(self) -> dict:
        """KMergeConfig fields (besides the base model) of the model this method trains."""
        raise NotImplementedError(f"method {self.name!r} does not implement model_options")


class PromptCompressor(Method):
    """A token-level prompt compressor, applied to the prompt ids at K = 1.

    Baselines that drop tokens are LoRA-tuned on their compressed prompts by default (the same
    training budget as kmerge); the sweep's ``--no-tune`` evaluates them zero-shot instead.
    """

    tune_optional = True

    def model_options(self) -> dict:
        return {
            "k": 1,
            "prompt_compressor": self.name,
            "compression_ratio": self.ratio,
            "compressor_seed": self.seed,
        }

    def compress(
        self, prompt_ids: Sequence[Sequence[int]], model: KMergeModel | None = None
    ) -> list[list[int]]:
        """Compress each prompt's token ids. ``model`` is the model being fed: compressors
        that need its base LM or tokenizer (self-information, meta-tokens) take it from there."""
        return [self.compress_one(list(ids)) for ids in prompt_ids]

    def compress_one(self, ids: list[int]) -> list[int]:
        raise NotImplementedError(f"compressor {self.name!r} does not implement compress_one")


class TokenSelector(PromptCompressor):
    """A compressor that keeps ``ceil(n / ratio)`` of the prompt's tokens, in their order."""

    def compress_one(self, ids: list[int]) -> list[int]:
        keep = kept_count(len(ids), self.ratio)
        return [ids[i] for i in sorted(self.select(ids, keep))]

    def select(self, ids: list[int], keep: int) -> list[int]:
        """Indices of the ``keep`` tokens to keep (any order)."""
        raise NotImplementedError(f"selector {self.name!r} does not implement select")


METHODS = Registry("method", KMergeConfigError)
register_method = METHODS.register  # class decorator: @register_method("name")


def get_method(name: str, ratio: float | None = None, seed: int = 0, **options) -> Method:
    """Instantiate a registered method at a target ratio (ignored by ratio-less methods)."""
    return METHODS.lookup(name)(ratio=ratio, seed=seed, **options)


def get_compressor(name: str, ratio: float | None = None, seed: int = 0) -> PromptCompressor:
    """A registered token-level compressor (what ``KMergeConfig.prompt_compressor`` names)."""
    check_compressor(name, ratio)
    return get_method(name, ratio, seed)


def check_compressor(name: str, ratio: float | None = None) -> None:
    """Refuse a name that is not a registered token-level compressor, or a ratio it cannot run
    at, without building it (``KMergeConfig`` checks its settings this way)."""
    cls = METHODS.lookup(name)
    if not issubclass(cls, PromptCompressor):
        raise KMergeConfigError(
            f"{name!r} is not a token-level prompt compressor; compressors: "
            + ", ".join(sorted(n for n, c in METHODS.items() if issubclass(c, PromptCompressor)))
        )
    cls.check_ratio_for(ratio)
