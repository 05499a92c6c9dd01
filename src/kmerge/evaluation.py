"""Evaluation: exact-match accuracy of greedy generations, with the measured compression."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from kmerge.modeling import KMergeModel
from kmerge.tasks import Example


def normalise_answer(text: str) -> str:
    """Exact match ignores surrounding whitespace and case."""
    return text.strip().lower()


def evaluate(
    model: KMergeModel,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = True,
    gather: Callable[[list], list] | None = None,
) -> dict:
    """Generate an answer for every example and compare it with the reference.

    ``max_new_tokens`` defaults to the longest reference answer (in tokens) plus one, so that
    a model which keeps talking after a correct answer is still caught.

    ``gather`` (e.g. ``accelerate.utils.gather_object``) lets each process evaluate its own
    shard of ``examples``: the per-example records of all shards are gathered, in rank order,
    before the metrics are computed, so they equal a single-process evaluation.

    Returns accuracy, the number of examples, mean prompt tokens, mean prompt positions fed to
    the model (measured from the batches), their ratio, wall time, and the predictions.
    """
    if not examples:
        raise ValueError("evaluate needs at least one example")
    tok = model.tokenizer
    if max_new_tokens is None:
        longest = max(
            len(tok(model.config.answer_separator + e.answer)["input_ids"]) for e in examples
        )
        max_new_tokens = longest + 1
    predictions: list[str] = []
    prompt_tokens = positions_fed = 0
    start = time.perf_counter()
    batches = range(0, len(examples), batch_size)
    for i in tqdm(batches, desc=f"eval K={model.k}", disable=not progress, leave=False):
        chunk = examples[i : i + batch_size]
        batch = model.prepare([e.prompt for e in chunk], reserve=max_new_tokens)
        ids = model.generate_ids(batch, max_new_tokens=max_new_tokens)
        predictions += [tok.decode(row, skip_special_tokens=True).strip() for row in ids]
        prompt_tokens += sum(batch.prompt_tokens)
        positions_fed += sum(batch.positions_fed)
    wall = time.perf_counter() - start
    records = [
        {"prediction": p, "correct": normalise_answer(p) == normalise_answer(e.answer)}
        for p, e in zip(predictions, examples)
    ]
    records[0] |= {"prompt_tokens": prompt_tokens, "positions_fed": positions_fed}
    if gather is not None:
        records = gather(records)
    prompt_tokens = sum(r.get("prompt_tokens", 0) for r in records)
    positions_fed = sum(r.get("positions_fed", 0) for r in records)
    predictions = [r["prediction"] for r in records]
    correct = sum(r["correct"] for r in records)
    n = len(records)
    return {
        "accuracy": correct / n,
        "n": n,
        "mean_prompt_tokens": prompt_tokens / n,
        "mean_positions_fed": positions_fed / n,
        "compression": prompt_tokens / positions_fed,
        "eval_seconds": wall,
        "predictions": predictions,
    }
