"""Task interface, the task registry, and a JSON Lines loader for user data."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kmerge.errors import KMergeDataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One prompt and its gold answer; `meta` is for inspection only, not equality."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task:
    """A benchmark that yields examples for a split. Subclasses implement `_examples`."""

    name: str = ""
    # Closed answer set when the task is a classification (used for accuracy by choice).
    answer_choices: tuple[str, ...] | None = None

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        check_split(split)
        return self._examples(split, n)

    def _examples(self, split: str, n: int | None) -> list[Example]:
        raise NotImplementedError(f"task {self.name!r} does not implement _examples")


TASKS: dict[str, type[Task]] = {}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise KMergeDataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a Task subclass available to `get_task(name)`."""

    def decorate(cls: type[Task]) -> type[Task]:
        if name in TASKS and TASKS[name] is not cls:
            raise KMergeDataError(f"task name {name!r} is already registered")
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorate


def get_task(name: str, **kwargs) -> Task:
    """Instantiate a registered task by name."""
    if name not in TASKS:
        known = ", ".join(sorted(TASKS)) or "(none)"
        raise KMergeDataError(f"unknown task {name!r}; known tasks: {known}")
    return TASKS[name](**kwargs)


def load_jsonl_examples(
    path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[Example]:
    """Read Examples from JSON Lines (plain or .gz), one object per line.

    Fields other than the prompt and answer go to `Example.meta`. Every problem raises
    KMergeDataError naming the file and the 1-based line, so a bad row is easy to find.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise KMergeDataError(f"{path}: cannot read file ({e})") from e

    examples = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path} line {lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise KMergeDataError(f"{where}: not valid UTF-8 (byte {e.start})") from e
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # tolerate a UTF-8 byte-order mark
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise KMergeDataError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise KMergeDataError(f"{where}: row is a {type(row).__name__}, not a JSON object")
        for key in (prompt_field, answer_field):
            if key not in row:
                raise KMergeDataError(f'{where}: row has no "{key}" field')
            if not isinstance(row[key], str):
                kind = type(row[key]).__name__
                raise KMergeDataError(f'{where}: "{key}" must be a string, got {kind}')
            if not row[key]:
                raise KMergeDataError(f'{where}: "{key}" is empty')
        meta = {k: v for k, v in row.items() if k not in (prompt_field, answer_field)}
        examples.append(Example(row[prompt_field], row[answer_field], meta))

    if not examples:
        raise KMergeDataError(f"{path}: file has no examples")
    return examples
