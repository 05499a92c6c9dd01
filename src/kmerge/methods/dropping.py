"""Baselines that keep ``ceil(n / ratio)`` of a prompt's tokens by position alone."""

from __future__ import annotations

import hashlib
import math
import random
from fractions import Fraction

from kmerge.methods.base import TokenSelector, register_method


@register_method("truncate_first")
class TruncateFirst(TokenSelector):
    """Keep the first tokens of the prompt."""

    def select(self, ids: list[int], keep: int) -> list[int]:
        return list(range(keep))


@register_method("truncate_last")
class TruncateLast(TokenSelector):
    """Keep the last tokens of the prompt (the end, nearest to the answer)."""

    def select(self, ids: list[int], keep: int) -> list[int]:
        return list(range(len(ids) - keep, len(ids)))


@register_method("truncate_head_tail")
class TruncateHeadTail(TokenSelector):
    """Keep the first ``keep // 2`` and the last ``keep - keep // 2`` tokens (the odd one goes
    to the end, where prompts usually put the question)."""

    def select(self, ids: list[int], keep: int) -> list[int]:
        head = keep // 2
        return list(range(head)) + list(range(len(ids) - (keep - head), len(ids)))


@register_method("random_drop")
class RandomDrop(TokenSelector):
    """Keep a random subset of the tokens. The draw depends only on the seed and the prompt's
    ids, so a prompt is compressed the same way in every epoch, batch and process."""

    def select(self, ids: list[int], keep: int) -> list[int]:
        digest = hashlib.sha256(repr((self.seed, ids)).encode()).hexdigest()
        return random.Random(digest).sample(range(len(ids)), keep)


@register_method("stride_drop")
class StrideDrop(TokenSelector):
    """Keep every ``ratio``-th token counted back from the last one (which is always kept):
    positions ``n - 1 - floor(j * ratio)`` for ``j < ceil(n / ratio)``. Non-integer ratios
    space the kept tokens evenly."""

    def select(self, ids: list[int], keep: int) -> list[int]:
        step = Fraction(str(self.ratio))  # exact, like kept_count
        return [len(ids) - 1 - math.floor(j * step) for j in range(keep)]
