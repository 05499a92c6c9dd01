"""Evaluation: the task's metrics, with the compression measured on the same batches.

Three kinds of pass, each run only when one of the task's metrics needs it:
- scoring: teacher-forced loss of the reference answer (perplexity);
- choice: the loss of every label word; the likelier label is the prediction (choice
  accuracy, macro-F1; with two labels also ROC-AUC of their loss difference, which does not
  depend on where the decision line sits), optionally weighed by a class prior;
- generation: greedy decoding (exact-match accuracy, line-level edit similarity), optionally
  on the first ``generate_n`` examples only, since it is the slow part.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from kmerge.distributed import root_unsharded, weights_sharded
from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.metrics import (
    exact_match,
    length_reduction,
    line_edit_similarity,
    macro_f1,
    normalise_answer,
    p_lf1,
    perplexity,
    perplexity_performance,
    roc_auc,
)
from kmerge.modeling import KMergeModel
from kmerge.tasks import Example, Task
from kmerge.tasks.base import example_protect_spans, name_example

__all__ = [
    "class_prior",
    "evaluate",
    "evaluate_sharded",
    "merge_shards",
    "normalise_answer",
    "shard_indices",
]

GENERATION_METRICS = ("accuracy", "edit_similarity")
CHOICE_METRICS = ("choice_accuracy", "macro_f1")


def evaluate(
    model: KMergeModel,
    examples: Sequence[Example],
    task: Task | None = None,
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    generate_n: int | None = None,
    reference_perplexity: float | None = None,
    progress: bool = True,
    gather: Callable[[list], list] | None = None,
    synced: bool = False,
    k: int | None = None,
    choice_prior: Mapping[str, float] | None = None,
) -> dict:
    """Compute ``task.metrics`` (default: exact-match ``accuracy``) on ``examples``.

    ``max_new_tokens`` defaults to the longest reference answer (in tokens) plus one, so that a
    model which keeps talking after a correct answer is still caught. ``generate_n`` defaults
    to the task's. ``reference_perplexity`` (the uncompressed model's) turns perplexity into
    the P of P-LF1; without it P-LF1 is reported only for metrics already in [0, 1].

    ``gather`` (e.g. ``accelerate.utils.gather_object``) lets each process evaluate its own
    shard of ``examples``: the per-example records of all shards are gathered, in rank order,
    before the metrics are computed, so they equal a single-process evaluation (``generate_n``
    then counts per shard).

    ``synced``: the model's weights are sharded (FSDP), so every forward pass is a collective
    step of all processes: generation keeps stepping until every process is done
    (``synced_gpus``). The shards must then have the same number of examples
    (``shard_indices``).

    ``k``: evaluate at this block size instead of the model's (a model trained with several K).

    ``choice_prior``: a probability per answer choice; the prediction is then the choice with
    the highest likelihood times prior (lowest ``nll - log prior``). A model trained on a
    class-balanced stream learnt equal priors; the data's own class frequencies put them back
    (logit adjustment, arXiv 2007.07314). Without it every choice weighs the same.

    Returns every metric, ``primary_metric`` (its name), n, mean prompt tokens, mean prompt
    positions fed (measured from the batches), their ratio, length reduction, P-LF1, wall time,
    and the per-example predictions (choice tasks: also each example's chosen label,
    ``choices``, and its loss for every label, ``choice_nll``).
    """
    if not examples:
        raise ValueError("evaluate needs at least one example")
    if batch_size < 1:
        raise KMergeConfigError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise KMergeConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    metrics = task.metrics if task else ("accuracy",)
    choices = task.answer_choices if task else None
    if set(CHOICE_METRICS) & set(metrics) and not choices:
        raise ValueError(f"{CHOICE_METRICS} need a task with answer_choices")
    log_prior = _log_prior(choice_prior, choices)
    if generate_n is None and task is not None:
        generate_n = task.generate_n
    n_generate = 0
    if set(GENERATION_METRICS) & set(metrics):
        n_generate = len(examples) if generate_n is None else min(generate_n, len(examples))
    primary = task.primary_metric if task else "accuracy"
    if primary in GENERATION_METRICS and examples and n_generate == 0:
        raise KMergeConfigError(
            f"generate_n=0 generates nothing, but the primary metric {primary!r} is measured "
            "on generated answers: use generate_n >= 1"
        )
    if max_new_tokens is None and n_generate:
        tok, sep = model.tokenizer, model.config.answer_separator
        longest = max(len(tok(sep + e.answer)["input_ids"]) for e in examples[:n_generate])
        max_new_tokens = longest + 1

    was_training = model.training
    model.eval()
    records = [{} for _ in examples]
    start = time.perf_counter()
    batches = range(0, len(examples), batch_size)
    try:
        for i in tqdm(batches, desc=f"eval K={model.k}", disable=not progress, leave=False):
            generate = max(0, min(batch_size, n_generate - i))
            try:
                _fill_records(
                    model, examples[i : i + batch_size], records[i : i + batch_size],
                    metrics, choices, generate, max_new_tokens, synced, k, log_prior,
                )  # fmt: skip
            except KMergeDataError as err:  # e.g. a prompt too long: name its row
                raise name_example(err, examples[i : i + batch_size]) from None
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start
    for row, example in zip(records, examples):
        row["answer"] = example.answer
    if gather is not None:
        records = gather(records)
    result = summarise(records, metrics, choices, reference_perplexity)
    out = result | {
        "k": model.k if k is None else k,
        "primary_metric": primary,
        "p_lf1": _p_lf1(result, primary, reference_perplexity),
        "eval_seconds": wall,
        "predictions": [r.get("prediction") for r in records],
    }
    if "choice_nll" in records[0]:
        out["choice_nll"] = [r["choice_nll"] for r in records]
    return out


PER_EXAMPLE_KEYS = ("predictions", "choices", "choice_nll")


def split_per_example(result: dict) -> tuple[dict, dict]:
    """Split an evaluation into its summary metrics and its per-example outputs (one entry per
    held-out example: worth a file, not a console)."""
    summary = {k: v for k, v in result.items() if k not in PER_EXAMPLE_KEYS}
    return summary, {k: result[k] for k in PER_EXAMPLE_KEYS if k in result}


def _log_prior(
    prior: Mapping[str, float] | None, choices: Sequence[str] | None
) -> dict[str, float] | None:
    if prior is None:
        return None
    if not choices or set(prior) != set(choices):
        raise KMergeConfigError(
            f"choice_prior must give a probability for each answer choice {list(choices or [])}"
            f", got {sorted(prior)}"
        )
    if any(not 0 < p <= 1 for p in prior.values()):
        raise KMergeConfigError(f"choice_prior probabilities must be in (0, 1], got {prior}")
    return {c: math.log(p) for c, p in prior.items()}


def class_prior(examples: Sequence[Example], choices: Sequence[str]) -> dict[str, float]:
    """How often each answer choice is the answer in ``examples`` (add-one smoothed, so that a
    class missing from the examples keeps a finite prior)."""
    counts = {c: 1 + sum(e.answer == c for e in examples) for c in choices}
    total = sum(counts.values())
    return {c: n / total for c, n in counts.items()}


@torch.no_grad()
def _fill_records(
    model: KMergeModel,
    chunk: Sequence[Example],
    rows: list[dict],
    metrics: Sequence[str],
    choices: Sequence[str] | None,
    generate: int,
    max_new_tokens: int | None,
    synced: bool = False,
    k: int | None = None,
    log_prior: Mapping[str, float] | None = None,
) -> None:
    """Run the passes the metrics need on one batch; write each example's results in ``rows``
    (prediction only for the first ``generate`` examples)."""
    prompts = [e.prompt for e in chunk]
    protect = example_protect_spans(chunk)
    if "perplexity" in metrics:
        nll, counts = _answer_nll(model, prompts, [e.answer for e in chunk], k, protect)
        for row, value, count in zip(rows, nll, counts):
            row |= {"nll": value, "answer_tokens": count}
    if set(CHOICE_METRICS) & set(metrics):
        scores = {c: _answer_nll(model, prompts, [c] * len(chunk), k, protect)[0] for c in choices}
        shift = log_prior or dict.fromkeys(choices, 0.0)
        for j, row in enumerate(rows):
            row["choice_nll"] = {c: scores[c][j] for c in choices}
            row["choice"] = min(choices, key=lambda c: scores[c][j] - shift[c])
    batch = model.prepare(prompts, reserve=max_new_tokens or 0, k=k, protect=protect)
    if generate:
        if generate < len(chunk):
            batch_to_generate = model.prepare(
                prompts[:generate],
                reserve=max_new_tokens,
                k=k,
                protect=protect[:generate] if protect else None,
            )
        else:
            batch_to_generate = batch
        ids = model.generate_ids(
            batch_to_generate, max_new_tokens=max_new_tokens, synced_gpus=synced
        )
        texts = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
        for row, text in zip(rows, texts):
            row["prediction"] = text.strip()
    for row, p, f in zip(rows, batch.prompt_tokens, batch.positions_fed):
        row |= {"prompt_tokens": p, "positions_fed": f}


def evaluate_sharded(
    accelerator: Accelerator,
    model: torch.nn.Module,
    examples: Sequence[Example],
    task: Task,
    choice_prior: Mapping[str, float] | None = None,
) -> dict:
    """:func:`evaluate` run by every process of a launch (``model`` as accelerate prepared it):
    each evaluates a shard and the per-example results are gathered, so the numbers equal one
    process's. The shards are padded to the same length: with sharded weights (FSDP) every
    process must run every forward pass."""
    gather = None
    if accelerator.num_processes > 1:
        indices = shard_indices(len(examples), accelerator.process_index, accelerator.num_processes)
        examples = [examples[i] for i in indices]

        def gather(records: list[dict]) -> list[dict]:
            return merge_shards(gather_object(list(zip(indices, records))))

    sharded = weights_sharded(accelerator)
    with root_unsharded(model) if sharded else contextlib.nullcontext():
        return evaluate(
            accelerator.unwrap_model(model), examples, task,
            progress=False, gather=gather, synced=sharded, choice_prior=choice_prior,
        )  # fmt: skip


def shard_indices(n: int, rank: int, processes: int) -> list[int]:
    """The indices of the examples process ``rank`` evaluates: contiguous shards (the first
    ``n % processes`` one longer), each padded to the longest by repeating its last index, so
    that every process runs the same batches (sharded weights need that). ``merge_shards``
    drops the repeats again."""
    base, extra = divmod(n, processes)
    start = rank * base + min(rank, extra)
    indices = list(range(start, start + base + (rank < extra)))
    longest = base + (extra > 0)
    return indices + [indices[-1] if indices else n - 1] * (longest - len(indices))


def merge_shards(gathered: list[tuple[int, dict]]) -> list[dict]:
    """Per-example records from ``(index, record)`` pairs of all shards, in example order,
    each index once (the padding repeats of ``shard_indices`` dropped)."""
    merged: dict[int, dict] = {}
    for index, record in gathered:
        merged.setdefault(index, record)
    return [merged[i] for i in sorted(merged)]


def _answer_nll(
    model: KMergeModel,
    prompts: list[str],
    answers: list[str],
    k: int | None = None,
    protect: list | None = None,
) -> tuple[list[float], list[int]]:
    """Per example: the summed negative log-likelihood of its answer tokens, and their count."""
    out = model.loss(model.prepare(prompts, answers, k=k, protect=protect))
    counts = out.answer_tokens.tolist()
    return (out.example_losses * out.answer_tokens).tolist(), counts


def choice_auc(records: Sequence[Mapping], choices: Sequence[str]) -> float | None:
    """ROC-AUC of two choices from records with ``choice_nll`` ({choice: NLL}) and ``answer``:
    the score is how much likelier the second choice is. None unless both answers occur."""
    first, second = choices
    labelled = [r for r in records if r["answer"] in choices]
    if {r["answer"] for r in labelled} != set(choices):
        return None
    return roc_auc(
        [r["choice_nll"][first] - r["choice_nll"][second] for r in labelled],
        [r["answer"] == second for r in labelled],
    )


def summarise(
    records: list[dict],
    metrics: Sequence[str],
    choices: Sequence[str] | None = None,
    reference_perplexity: float | None = None,
) -> dict:
    """The metrics and compression numbers from per-example records."""
    n = len(records)
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    positions_fed = sum(r["positions_fed"] for r in records)
    out: dict = {"n": n}
    generated = [r for r in records if "prediction" in r]
    # Generation metrics average over the generated examples only (generate_n may be 0).
    if "accuracy" in metrics and generated:
        hits = [exact_match(r["prediction"], r["answer"]) for r in generated]
        out["accuracy"] = sum(hits) / len(hits)
    if "edit_similarity" in metrics and generated:
        sims = [line_edit_similarity(r["prediction"], r["answer"]) for r in generated]
        out["edit_similarity"] = sum(sims) / len(sims)
    if set(GENERATION_METRICS) & set(metrics):
        out["n_generated"] = len(generated)
    if "choice_accuracy" in metrics:
        out["choice_accuracy"] = sum(r["choice"] == r["answer"] for r in records) / n
    if "macro_f1" in metrics:
        out["macro_f1"] = macro_f1(
            [r["choice"] for r in records], [r["answer"] for r in records], labels=choices
        )
    if choices is not None and len(choices) == 2 and "choice_nll" in records[0]:
        auc = choice_auc(records, choices)
        if auc is not None:
            out["choice_auc"] = auc
    if "perplexity" in metrics:
        total_nll = sum(r["nll"] for r in records)
        out["perplexity"] = perplexity(total_nll, sum(r["answer_tokens"] for r in records))
    out |= {
        "mean_prompt_tokens": prompt_tokens / n,
        "mean_positions_fed": positions_fed / n,
        "compression": prompt_tokens / positions_fed,
        "length_reduction": length_reduction(prompt_tokens, positions_fed),
    }
    if choices is not None and "choice" in records[0]:
        out["choices"] = [r["choice"] for r in records]
    return out


def _p_lf1(result: dict, primary: str, reference_perplexity: float | None) -> float | None:
    if primary == "perplexity":
        if reference_perplexity is None:
            return None
        performance = perplexity_performance(result["perplexity"], reference_perplexity)
    else:
        performance = result[primary]
    return p_lf1(performance, max(0.0, result["length_reduction"]))
