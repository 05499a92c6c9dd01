"""Amazon Reviews sentiment ("K-Token Merging"): positive when the rating is >= 3.5.

Prompt ``Review: {text}, Label:``, answer ``positive`` or ``negative``. Rows come from the
Hugging Face hub (McAuley-Lab/Amazon-Reviews-2023, one category's raw review file) or from
local JSON Lines / CSV files with at least the ``text`` and ``rating`` fields (a folder with
``*train*`` and ``*test*`` files; without a test file, the train rows are cut by product).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kmerge.errors import KMergeDataError
from kmerge.tasks.base import Example, register_task
from kmerge.tasks.records import RecordTask, Row, hub_records, number_field, text_field

POSITIVE_THRESHOLD = 3.5
PROMPT = "Review: {text}, Label:"


def review_label(rating: float) -> str:
    return "positive" if rating >= POSITIVE_THRESHOLD else "negative"


@register_task("amazon_reviews")
class AmazonReviewsTask(RecordTask):
    answer_choices = ("negative", "positive")
    query_pattern = r", Label:$"
    metrics = ("choice_accuracy", "accuracy", "macro_f1")
    primary_metric = "choice_accuracy"
    split_key = "parent_asin"  # hub rows; local rows use "asin" (see convert/_cut)
    HUB_ID = "McAuley-Lab/Amazon-Reviews-2023"

    def __init__(
        self,
        data_dir: str | None = None,
        category: str = "Amazon_Fashion",
        hub_id: str = HUB_ID,
        seed: int = 0,
        skip_bad_rows: bool = False,
        test_fraction: float = 0.1,
    ) -> None:
        super().__init__(data_dir, seed, skip_bad_rows, test_fraction)
        self.category = category
        self.hub_id = hub_id
        if data_dir is not None:
            self.split_key = "asin"

    def convert(self, row: Mapping) -> Example:
        text = text_field(row, "text")
        rating = number_field(row, "rating")
        if not 1 <= rating <= 5:
            raise KMergeDataError(f'"rating" must be between 1 and 5, got {rating:g}')
        return Example(PROMPT.format(text=text), review_label(rating), {"rating": rating})

    def hub_rows(self) -> Iterable[tuple[str, Row]]:
        return hub_records(self.hub_id, f"raw/review_categories/{self.category}.jsonl")
