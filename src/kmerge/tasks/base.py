"""Task interface and the task registry."""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.registry import Registry

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One prompt and its gold answer; `meta` is for inspection only, not equality. Examples
    read from records carry their row as ``meta["where"]`` ("data.jsonl line 7")."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task:
    """A benchmark that yields examples for a split and names its metrics.

    Subclasses implement `_examples`. Metric names are those of `kmerge.evaluation.evaluate`:
    "accuracy" (exact match of free generation), "choice_accuracy" and "macro_f1" (the model
    picks the likelier of `answer_choices`), "perplexity" of the answer tokens, and
    "edit_similarity" (line-level, of greedy generations).
    """

    name: str = ""
    # Closed answer set when the task is a classification (used for accuracy by choice).
    answer_choices: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    primary_metric: str = "accuracy"  # the headline number (P in P-LF1, the curriculum gate)
    # How many examples evaluation generates for (None: all); generation is the slow part.
    generate_n: int | None = None
    skipped_rows: int = 0  # bad rows skipped while loading (skip_bad_rows)
    filtered_rows: int = 0  # good rows the task's own filter left out (reported, never silent)
    # The question part of the task's prompts, as a regular expression: what `protect_query`
    # keeps as ordinary tokens (KMergeConfig.protect_pattern). None: the task has none.
    query_pattern: str | None = None
    # The task can make as many fresh training examples as a run consumes (n_train=None).
    generates_examples: bool = False
    # Named levels a run picks one of (its ``stage``) and a curriculum walks, easiest first
    # (the tree's sizes); empty: the task has one level.
    stages: tuple[str, ...] = ()

    @classmethod
    def run_options(cls, stage: str, n_eval: int, n_train: int | None) -> dict:
        """Constructor options that come from a run's settings rather than its task options:
        the stage and split sizes, for tasks that take them (see ``build_task``)."""
        return {}

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        return self._examples(split, n)

    def has_split(self, split: str) -> bool:
        """Whether there is data for ``split`` (a user's files may come without an eval file:
        the run then trains without evaluating)."""
        check_split(split)
        return True

    def _examples(self, split: str, n: int | None) -> list[Example]:
        raise NotImplementedError(f"task {self.name!r} does not implement _examples")


TASKS = Registry("task", KMergeDataError)
register_task = TASKS.register  # class decorator: @register_task("name")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise KMergeDataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def get_task(name: str, **kwargs) -> Task:
    """Instantiate a registered task by name."""
    cls = TASKS.lookup(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise KMergeDataError(
            f"task {name!r} does not take {', '.join(unknown)}; its options: {', '.join(accepted)}"
        )
    return cls(**kwargs)


def build_task(
    name: str,
    seed: int,
    stage: str,
    n_eval: int,
    n_train: int | None = None,
    options: dict | None = None,
) -> Task:
    """A task from the settings train and eval share: ``options`` go to the task's constructor,
    with what the task takes of the stage and split sizes (``Task.run_options``; tasks that
    generate examples have their own ``n_train`` default)."""
    run_options = TASKS.lookup(name).run_options(stage, n_eval, n_train)
    return get_task(name, **({"seed": seed} | (options or {}) | run_options))


def task_stages(name: str) -> tuple[str, ...]:
    """The stages of task ``name`` (empty for an unknown one: building it says so)."""
    cls = TASKS.get(name)
    return cls.stages if cls else ()


def query_pattern(name: str) -> str:
    """The question pattern of task ``name`` (what ``--protect-query`` keeps raw), or a clear
    error for a task that marks none."""
    pattern = TASKS.lookup(name).query_pattern
    if pattern is None:
        raise KMergeConfigError(
            f"task {name!r} marks no question to keep raw (no query_pattern); "
            "use --protect-pattern REGEX"
        )
    return pattern


def check_stages(name: str, stages: Sequence[str]) -> None:
    """Refuse stages that task ``name`` does not have, in one line naming those it has."""
    known = task_stages(name)
    for stage in stages:
        if not known:
            staged = ", ".join(sorted(n for n, c in TASKS.items() if c.stages))
            raise KMergeConfigError(f"task {name!r} has no stages (tasks with stages: {staged})")
        if stage not in known:
            raise KMergeConfigError(f"unknown {name} stage {stage!r}; known: {', '.join(known)}")


def sample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``n`` examples (all of them, shuffled, when n is None)."""
    if n is not None and n < 1:
        raise KMergeDataError(f"the number of examples must be >= 1, got {n}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:n]


def example_protect_spans(examples: Sequence[Example]) -> list[list[tuple[int, int]]] | None:
    """Per example, the character spans of the texts its data row marks as protected
    (``meta["protect"]``, a row's ``protect`` field) in its prompt as it is now (a text cut away
    by ``fit_prompts`` protects nothing); None when no example has any."""
    import re

    spans = [
        [m.span() for text in e.meta.get("protect") or [] for m in re.finditer(re.escape(text),
                                                                             e.prompt)]
        for e in examples
    ]  # fmt: skip
    return spans if any(spans) else None


ELISION = " [...] "


def name_example(err: KMergeDataError, examples) -> KMergeDataError:
    """``err`` about one of ``examples`` (its ``index`` attribute), naming the file and line
    the example came from when it carries them; else ``err`` itself."""
    index = getattr(err, "index", None)
    if index is None or not 0 <= index < len(examples):
        return err
    where = examples[index].meta.get("where")
    return KMergeDataError(f"{where}: {err}") if where else err


def fit_prompts(
    examples: list[Example], tokenizer, max_prompt_tokens: int | None
) -> tuple[list[Example], int]:
    """Shorten prompts longer than ``max_prompt_tokens`` tokens; return them and how many.

    Policy: keep the head and the tail of the prompt, about half the budget each, joined by
    ``ELISION`` (which counts towards the budget). The built-in templates put their instruction
    first and the question ("Label:", "Instructions: ... New Content:") last, so the cut falls
    inside the review text / old file. Shortened examples get ``meta["prompt_cut"] = True``.
    """
    if max_prompt_tokens is None:
        return list(examples), 0
    marker = len(tokenizer(ELISION, add_special_tokens=False)["input_ids"])
    if max_prompt_tokens < marker + 2:
        raise KMergeDataError(f"max_prompt_tokens must be >= {marker + 2}, got {max_prompt_tokens}")
    out, n_cut = [], 0
    for example in examples:
        ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_tokens:
            out.append(example)
            continue
        budget = max_prompt_tokens - marker
        while True:  # decoding and re-encoding can merge tokens at the seams: re-check
            head, tail = (budget + 1) // 2, budget // 2
            # ids[len(ids) - tail:], not ids[-tail:], which is the whole list when tail is 0
            text = tokenizer.decode(ids[:head]) + ELISION + tokenizer.decode(ids[len(ids) - tail :])
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
                break
            budget -= 1
        out.append(Example(text, example.answer, example.meta | {"prompt_cut": True}))
        n_cut += 1
    return out, n_cut
