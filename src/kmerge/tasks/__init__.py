"""Task registry: benchmarks that yield (prompt, answer) examples."""

from kmerge.tasks import tree  # noqa: F401  (registers "tree")
from kmerge.tasks.base import (
    TASKS,
    Example,
    KMergeDataError,
    Task,
    get_task,
    load_jsonl_examples,
    register_task,
)

__all__ = [
    "TASKS",
    "Example",
    "KMergeDataError",
    "Task",
    "get_task",
    "load_jsonl_examples",
    "register_task",
]
