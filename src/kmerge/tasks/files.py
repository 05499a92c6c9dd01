"""User data: `jsonl` and `csv` tasks read (prompt, answer) pairs from the user's own files.

The prompt is one field (``prompt_field``) or a template over the row's fields
(``prompt_template="Review: {text}, Label:"``); the answer is ``answer_field``. With
``answer_choices`` the task is a classification and gets choice accuracy and macro-F1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from kmerge.errors import KMergeDataError
from kmerge.tasks.base import Example, check_split, register_task
from kmerge.tasks.records import (
    Converted,
    RecordTask,
    convert_records,
    file_format,
    format_template,
    read_records,
    text_field,
)

METRICS = ("accuracy", "choice_accuracy", "macro_f1", "perplexity", "edit_similarity")


def protect_spans(prompt: str, protect: object) -> list[tuple[int, int]]:
    """Character spans of every occurrence in ``prompt`` of a row's ``protect`` text (a string
    or a list of strings): the parts that stay ordinary tokens (KMergeModel.prepare)."""
    texts = [protect] if isinstance(protect, str) else protect
    if not isinstance(texts, list) or not all(isinstance(t, str) and t for t in texts):
        raise KMergeDataError(
            f"field 'protect' must be a non-empty string or a list of them, got {protect!r}"
        )
    spans = []
    for text in texts:
        found = [m.span() for m in re.finditer(re.escape(text), prompt)]
        if not found:
            raise KMergeDataError(f"protect text {text!r} does not occur in the prompt")
        spans += found
    return spans


def row_converter(
    prompt_field: str = "prompt", answer_field: str = "answer", prompt_template: str | None = None
):
    """A function turning a row into an Example; other fields go to `Example.meta`."""

    def convert(row: Mapping) -> Example:
        if prompt_template is not None:
            prompt = format_template(prompt_template, row)
        else:
            prompt = text_field(row, prompt_field)
        answer = text_field(row, answer_field)
        meta = {k: v for k, v in row.items() if k not in (prompt_field, answer_field)}
        if row.get("protect") not in (None, ""):
            protect_spans(prompt, row["protect"])  # every text must occur in the prompt
            protect = row["protect"]
            meta["protect"] = [protect] if isinstance(protect, str) else list(protect)
        return Example(prompt, answer, meta)

    return convert


def load_examples_file(
    path: str | Path,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    prompt_template: str | None = None,
    skip_bad_rows: bool = False,
) -> Converted:
    """Examples from one JSON Lines or CSV file (plain or .gz), with the bad-row count."""
    convert = row_converter(prompt_field, answer_field, prompt_template)
    return convert_records(read_records(path), convert, skip_bad_rows, str(path))


class FileTask(RecordTask):
    """(prompt, answer) rows from a train file and an eval file chosen by the user."""

    file_format = "jsonl"

    def __init__(
        self,
        train_file: str | None = None,
        eval_file: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        prompt_template: str | None = None,
        answer_choices: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        seed: int = 0,
        skip_bad_rows: bool = False,
    ) -> None:
        super().__init__(None, seed, skip_bad_rows)
        for path in (train_file, eval_file):
            if path is not None and file_format(path) != self.file_format:
                raise KMergeDataError(
                    f"task {self.name!r} reads {self.file_format} files, got {path} "
                    f"(use --task {file_format(path)})"
                )
        self.files = {"train": train_file, "test": eval_file}
        self.convert = row_converter(prompt_field, answer_field, prompt_template)
        if answer_choices:
            self.answer_choices = tuple(answer_choices)
        default = ("accuracy", "choice_accuracy", "macro_f1") if answer_choices else ("accuracy",)
        self.metrics = tuple(metrics or default)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise KMergeDataError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
        if not answer_choices and {"choice_accuracy", "macro_f1"} & set(self.metrics):
            raise KMergeDataError("choice_accuracy and macro_f1 need answer_choices")
        self.primary_metric = self.metrics[0]

    def has_split(self, split: str) -> bool:
        check_split(split)
        return self.files[split] is not None

    def local_file(self, split: str) -> Path | None:
        path = self.files[split]
        if path is None:
            flag = "--train-file" if split == "train" else "--eval-file"
            raise KMergeDataError(f"task {self.name!r} has no {split} data: pass {flag}")
        return Path(path)


@register_task("jsonl")
class JsonlTask(FileTask):
    file_format = "jsonl"


@register_task("csv")
class CsvTask(FileTask):
    file_format = "csv"
