"""Reconstruction steps: the language model repeats a merged prompt as ordinary tokens.

A task answer gives the model one or a few tokens of signal about what a merged vector holds; a
reconstruction target gives it every token of the prompt. That is ICAE's autoencoding objective
(arXiv 2307.06945) used as an auxiliary task: a share of the optimizer steps trains the LoRA and
the encoder to decode the merged prompt back into its tokens, the other steps train the task.

A reconstruction example is the task's prompt followed by a short instruction that stays raw
(protected), so the model can tell the two kinds of step apart; its answer is the prompt itself.
A ``protect_pattern`` anchored at the prompt's end (the tasks' question patterns end in ``$``)
does not match a reconstruction prompt, so there the question is merged like the rest.
"""

from __future__ import annotations

import math

from kmerge.tasks.base import Example

# Kept as ordinary tokens after the merged prompt: the only thing that says "repeat, don't answer".
RECONSTRUCT_INSTRUCTION = "\nRepeat the text above:"


def reconstruction_example(example: Example) -> Example:
    """``example``'s prompt to be repeated: the instruction appended (and protected), the prompt
    as the answer. Protected texts the example already has stay protected."""
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
