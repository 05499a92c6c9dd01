"""Task registry: benchmarks that yield (prompt, answer) examples and name their metrics."""

from kmerge.tasks import amazon, commitpack, files, tree  # noqa: F401  (register the tasks)
from kmerge.tasks.base import (
    TASKS,
    Example,
    KMergeDataError,
    Task,
    build_task,
    check_stages,
    get_task,
    register_task,
    task_stages,
)
from kmerge.tasks.files import load_examples_file
from kmerge.tasks.records import RecordTask

__all__ = [
    "TASKS",
    "Example",
    "KMergeDataError",
    "RecordTask",
    "Task",
    "build_task",
    "check_stages",
    "get_task",
    "load_examples_file",
    "register_task",
    "task_stages",
]
