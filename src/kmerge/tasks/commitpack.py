"""CommitPackFT code editing ("K-Token Merging"): rewrite a file as a commit's subject asks.

Prompt: an instruction line, ``Old Content: {old_contents}``, ``Instructions: {subject}``,
``New Content:``; the answer is ``new_contents``. Rows come from the Hugging Face hub
(bigcode/commitpackft, one language's data file) or local files with the same fields. The
paper reports the perplexity of the answer tokens; evaluation adds exact match and line-level
edit similarity of greedy generations on a few examples (`generate_n`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kmerge.errors import KMergeDataError
from kmerge.tasks.base import Example, register_task
from kmerge.tasks.records import RecordTask, Row, hub_records, text_field

PROMPT = (
    "Update the old {lang} code content based on the instructions.\n"
    "Old Content: {old}\n"
    "Instructions: {subject}\n"
    "New Content:"
)


@register_task("commitpackft")
class CommitPackFTTask(RecordTask):
    metrics = ("perplexity", "accuracy", "edit_similarity")
    query_pattern = r"\nInstructions: [^\n]*\nNew Content:$"
    primary_metric = "perplexity"
    generate_n = 8
    split_key = "commit"
    HUB_ID = "bigcode/commitpackft"

    def __init__(
        self,
        data_dir: str | None = None,
        language: str = "python",
        hub_id: str = HUB_ID,
        max_file_chars: int | None = None,
        generate_n: int | None = 8,
        seed: int = 0,
        skip_bad_rows: bool = False,
        test_fraction: float = 0.1,
    ) -> None:
        super().__init__(data_dir, seed, skip_bad_rows, test_fraction)
        if max_file_chars is not None and max_file_chars < 1:
            raise KMergeDataError(f"max_file_chars must be >= 1, got {max_file_chars}")
        self.language = language
        self.hub_id = hub_id
        self.max_file_chars = max_file_chars
        self.generate_n = generate_n
        self.filtered_rows = 0  # rows left out by max_file_chars (reported, never silent)

    def convert(self, row: Mapping) -> Example:
        old = row.get("old_contents")
        if not isinstance(old, str):  # may be empty: a commit that fills an empty file
            raise KMergeDataError('"old_contents" must be a string')
        new = text_field(row, "new_contents")
        subject = text_field(row, "subject")
        lang = row.get("lang") or self.language
        prompt = PROMPT.format(lang=str(lang).lower(), old=old, subject=subject)
        meta = {"commit": row.get("commit"), "file": row.get("new_file"), "old_chars": len(old)}
        return Example(prompt, new, meta)

    def _load(self, split: str) -> list[Example]:
        examples = super()._load(split)
        if self.max_file_chars is None:
            return examples
        kept = [
            e for e in examples if max(e.meta["old_chars"], len(e.answer)) <= self.max_file_chars
        ]
        self.filtered_rows += len(examples) - len(kept)
        if not kept:
            raise KMergeDataError(f"no {split} commit has files within {self.max_file_chars} chars")
        return kept

    def hub_rows(self) -> Iterable[tuple[str, Row]]:
        return hub_records(self.hub_id, f"data/{self.language}/data.jsonl")
