"""The task constructor options the CLI offers (``--data-dir``, ``--train-file``, ...).

Each task takes the subset that applies to it (see its ``__init__``); ``get_task`` refuses an
option the chosen task does not take, so a flag is never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from kmerge.options import option


@dataclass
class TaskOptions:
    data_dir: str | None = option(
        None,
        "local *train* / *test* files (amazon_reviews, commitpackft); default: the Hugging Face "
        "hub",
    )
    category: str | None = option(None, "amazon_reviews: hub review category")
    language: str | None = option(None, "commitpackft: language")
    max_file_chars: int | None = option(
        None, "commitpackft: leave out commits whose old or new file is longer"
    )
    train_file: str | None = option(None, "jsonl/csv: training rows")
    eval_file: str | None = option(None, "jsonl/csv: held-out rows")
    prompt_field: str | None = option(None, 'jsonl/csv: the prompt column (default "prompt")')
    answer_field: str | None = option(None, 'jsonl/csv: the answer column (default "answer")')
    prompt_template: str | None = option(
        None, 'jsonl/csv: e.g. "Review: {text}, Label:" (row fields in braces)'
    )
    answer_choices: list[str] | None = option(
        None, "jsonl/csv: the labels (adds choice accuracy, macro-F1)"
    )
    metrics: list[str] | None = option(None, "jsonl/csv: metric names")
    ancestor_negatives: float | None = option(
        None,
        "tree, training questions only: the chance that a 'false' question asks about a "
        "grandparent (or higher ancestor) where the tree has one, instead of a uniformly drawn "
        "pair (default 0: uniform); held-out questions stay uniform",
    )
    skip_bad_rows: bool = option(
        False, "skip and count malformed rows instead of stopping at the first"
    )
