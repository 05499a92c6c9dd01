"""Reconstruction steps: the language model repeats a merged prompt as ordinary tokens.

A task answer gives the model one or a few tokens of signal about what a merged vector holds; a
reconstruction target gives it every token of the prompt. That is ICAE's autoencoding objective
(arXiv 2307.06945) used as an auxiliary task: a share of the optimizer steps trains the LoRA and
the encoder to decode the merged prompt back into its tokens, the other steps train the task.

A reconstruction example is the task's prompt followed by a short instruction that stays raw
(protected), so the model can tell the two kinds of step apart; its answer is the prompt itself.
A ``protect_pattern`` anchored at the prompt's end (the tasks' question patterns end in ``$``)
does not match a reconstruction prompt, so there the question is merged like the rest.

The other objective, ``continue``, is ICAE's text continuation: the first half of the prompt
is merged and the model writes the second half as tokens. It asks the model to understand the
merged text well enough to go on with it, rather than to copy it back.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from kmerge.tasks.base import Example

Objective = Literal["repeat", "continue"]

# Kept as ordinary tokens after the merged prompt: the only thing that says "repeat, don't answer".
RECONSTRUCT_INSTRUCTION = "\nRepeat the text above:"


def reconstruction_example(example: Example, objective: Objective = "repeat") -> Example:
    """``example``'s prompt to be repeated: the instruction appended (and protected), the prompt
    as the answer. Protected texts the example already has stay protected. With ``objective``
    "continue", the continuation example instead."""
    if objective == "continue":
        return continuation_example(example)
    protect = [*(example.meta.get("protect") or []), RECONSTRUCT_INSTRUCTION]
    return Example(
        prompt=example.prompt + RECONSTRUCT_INSTRUCTION,
        answer=example.prompt,
        meta={**example.meta, "protect": protect},
    )


def is_reconstruction_step(step: int, share: float) -> bool:
    """Whether optimizer step ``step`` (0-based) reconstructs: spread evenly so that any window
    of steps holds ``share`` of them (to within one), the same on a resumed run."""
    return share > 0 and math.floor((step + 1) * share) > math.floor(step * share)


def continuation_example(example: Example) -> Example:
    """``example``'s prompt cut at the whitespace nearest its middle: the first half is the
    prompt (merged), the rest, from that whitespace on, the answer, so that prompt + answer is
    the original text. Protected texts stay protected where they remain in the first half."""
    text = example.prompt
    middle = len(text) // 2
    cuts = [m.start() for m in re.finditer(r"\s", text) if m.start() > 0]
    cut = min(cuts, key=lambda c: abs(c - middle)) if cuts else max(middle, 1)
    return Example(prompt=text[:cut], answer=text[cut:], meta=example.meta)
