"""evaluate() on a tiny model: each pass agrees with the model's own losses, results do not
depend on the batch size, sharded evaluation gathers to the single-process numbers, and the
summaries follow hand-made records."""

from __future__ import annotations

import math

import pytest
import torch

from kmerge.errors import KMergeConfigError
from kmerge.evaluation import class_prior, evaluate, evaluate_sharded, summarise
from kmerge.metrics import roc_auc
from kmerge.tasks import Example, Task
from tests.conftest import randomise_trainables
from tests.helpers import assert_greedy_equivalent


class Sentiment(Task):
    name = "sentiment-test"
    answer_choices = ("negative", "positive")
    metrics = ("choice_accuracy", "accuracy", "macro_f1", "perplexity")
    primary_metric = "choice_accuracy"


EXAMPLES = [
    Example(f"Review: {text}, Label:", label)
    for text, label in [
        ("great shirt, fits well", "positive"),
        ("fell apart after one wash", "negative"),
        ("love it", "positive"),
        ("too small and the colour is wrong", "negative"),
        ("ok for the price I guess, would buy again", "positive"),
    ]
]


@pytest.fixture
def model(tiny_model):
    m = tiny_model(2, base_overrides={"initializer_range": 0.3})
    randomise_trainables(m, seed=1, std=0.05)
    return m


def record_generated_ids(model, monkeypatch) -> list[list[int]]:
    """The token id rows ``evaluate`` generates, appended in call order."""
    rows: list[list[int]] = []
    original = model.generate_ids

    def generate_ids(*args, **kwargs):
        out = original(*args, **kwargs)
        rows.extend(out)
        return out

    monkeypatch.setattr(model, "generate_ids", generate_ids)
    return rows


def assert_same_predictions(model, a, ids_a, b, ids_b):
    """Two evaluations generated the same greedy tokens up to near-ties (tests/helpers.py), and
    the same prediction wherever the tokens agree."""
    assert len(ids_a) == len(ids_b) == len(EXAMPLES)
    assert_greedy_equivalent(model, [e.prompt for e in EXAMPLES], ids_a, ids_b)
    for i, (row_a, row_b) in enumerate(zip(ids_a, ids_b)):
        if row_a == row_b:
            assert a["predictions"][i] == b["predictions"][i], i


def test_choices_and_perplexity_follow_the_model_losses(model):
    result = evaluate(model, EXAMPLES, Sentiment(), batch_size=2, progress=False)
    with torch.no_grad():
        for example, choice in zip(EXAMPLES, result["choices"]):
            nll = {
                c: model([example.prompt], [c]).loss.item()
                * model([example.prompt], [c]).answer_tokens.item()
                for c in Sentiment.answer_choices
            }
            assert choice == min(nll, key=nll.get)
        out = model([e.prompt for e in EXAMPLES], [e.answer for e in EXAMPLES])
        total = (out.example_losses * out.answer_tokens).sum().item()
        expected = math.exp(total / out.answer_tokens.sum().item())
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    hits = [c == e.answer for c, e in zip(result["choices"], EXAMPLES)]
    assert result["choice_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert result["n_generated"] == len(EXAMPLES) and result["primary_metric"] == "choice_accuracy"
    assert 0 <= result["p_lf1"] <= 1


def test_results_do_not_depend_on_the_batch_size(model, monkeypatch):
    generated = record_generated_ids(model, monkeypatch)
    one = evaluate(model, EXAMPLES, Sentiment(), batch_size=1, progress=False)
    ids_one = generated.copy()
    generated.clear()
    many = evaluate(model, EXAMPLES, Sentiment(), batch_size=4, progress=False)
    assert one["choices"] == many["choices"]
    assert_same_predictions(model, one, ids_one, many, generated)
    assert one["perplexity"] == pytest.approx(many["perplexity"], rel=1e-5)
    assert one["mean_positions_fed"] == many["mean_positions_fed"]


def test_generate_n_limits_generation_only(model):
    task = Sentiment()
    task.generate_n = 2
    result = evaluate(model, EXAMPLES, task, batch_size=3, progress=False)
    assert result["n_generated"] == 2 and result["n"] == 5
    assert [p is not None for p in result["predictions"]] == [True, True, False, False, False]
    assert len(result["choices"]) == 5  # scoring still covers every example


def test_generate_n_zero_scores_choices_and_reports_no_accuracy(model):
    full = evaluate(model, EXAMPLES, Sentiment(), progress=False)
    result = evaluate(model, EXAMPLES, Sentiment(), generate_n=0, progress=False)
    assert result["n_generated"] == 0 and "accuracy" not in result
    assert result["predictions"] == [None] * 5
    assert result["choices"] == full["choices"]
    assert result["choice_accuracy"] == pytest.approx(full["choice_accuracy"])


def test_generate_n_zero_is_refused_when_the_primary_metric_is_generated(model):
    task = Sentiment()
    task.primary_metric = "accuracy"
    with pytest.raises(KMergeConfigError, match="generate_n=0"):
        evaluate(model, EXAMPLES, task, generate_n=0, progress=False)


def test_compression_is_measured(model):
    result = evaluate(model, EXAMPLES, Sentiment(), progress=False)
    batch = model.prepare([e.prompt for e in EXAMPLES])
    assert result["mean_prompt_tokens"] == sum(batch.prompt_tokens) / len(EXAMPLES)
    assert result["mean_positions_fed"] == sum(batch.positions_fed) / len(EXAMPLES)
    assert result["length_reduction"] == pytest.approx(
        1 - result["mean_positions_fed"] / result["mean_prompt_tokens"]
    )


def test_sharded_evaluation_gathers_to_the_single_process_result(model, monkeypatch):
    """Two shards, as two processes would evaluate them; `gather` puts their records together."""
    generated = record_generated_ids(model, monkeypatch)
    full = evaluate(model, EXAMPLES, Sentiment(), progress=False)
    ids_full = generated.copy()
    generated.clear()
    shards = [EXAMPLES[:3], EXAMPLES[3:]]
    collected: list[list] = []

    def gather_second(records: list) -> list:  # rank 1 sees rank 0's records first
        return collected[0] + records

    evaluate(
        model, shards[0], Sentiment(), progress=False, gather=lambda r: collected.append(r) or r
    )
    merged = evaluate(model, shards[1], Sentiment(), progress=False, gather=gather_second)
    for key in ("choice_accuracy", "macro_f1", "accuracy", "mean_positions_fed", "n"):
        assert merged[key] == pytest.approx(full[key])
    assert merged["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    assert_same_predictions(model, merged, generated, full, ids_full)


def test_perplexity_p_lf1_needs_the_reference(model):
    class Code(Task):
        metrics = ("perplexity",)
        primary_metric = "perplexity"

    examples = [Example("Old: x = 1\nNew:", "x = 2")] * 2
    alone = evaluate(model, examples, Code(), progress=False)
    assert alone["p_lf1"] is None and "accuracy" not in alone and "n_generated" not in alone
    ref = evaluate(model, examples, Code(), progress=False, reference_perplexity=1.0)
    reduction = ref["length_reduction"]
    performance = 1.0 / ref["perplexity"]
    assert ref["p_lf1"] == pytest.approx(2 * performance * reduction / (performance + reduction))


def test_summarise_by_hand():
    records = [
        {"prompt_tokens": 8, "positions_fed": 2, "answer": "a\nb", "prediction": "a\nb",
         "choice": "a\nb"},
        {"prompt_tokens": 4, "positions_fed": 1, "answer": "a\nb", "prediction": "a\nc",
         "choice": "x"},
    ]  # fmt: skip
    out = summarise(records, ("accuracy", "edit_similarity", "choice_accuracy"), ("a\nb", "x"))
    assert out["accuracy"] == 0.5
    assert out["edit_similarity"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["choice_accuracy"] == 0.5
    assert out["mean_prompt_tokens"] == 6 and out["compression"] == 4.0


def test_choice_metrics_need_choices(model):
    class NoChoices(Task):
        metrics = ("macro_f1",)

    with pytest.raises(ValueError, match="answer_choices"):
        evaluate(model, EXAMPLES, NoChoices(), progress=False)


def test_evaluate_sharded_in_one_process_is_evaluate(model):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    sharded = evaluate_sharded(accelerator, model, EXAMPLES, Sentiment())
    full = evaluate(model, EXAMPLES, Sentiment(), progress=False)
    for key in ("choice_accuracy", "macro_f1", "accuracy", "perplexity", "n"):
        assert sharded[key] == pytest.approx(full[key])


def test_choice_scores_auc_and_prior(model):
    """Each example's per-choice losses are reported; ROC-AUC ranks their difference; a class
    prior moves exactly the decisions whose loss gap is smaller than the log prior ratio."""
    plain = evaluate(model, EXAMPLES, Sentiment(), progress=False)
    gaps = [r["negative"] - r["positive"] for r in plain["choice_nll"]]  # > 0: "positive"
    assert plain["choices"] == ["positive" if g > 0 else "negative" for g in gaps]
    positive = [e.answer == "positive" for e in EXAMPLES]
    assert plain["choice_auc"] == pytest.approx(roc_auc(gaps, positive))
    # A prior whose log ratio sits between two gaps flips the decisions below it, and only them.
    ordered = sorted(gaps)
    cut = (ordered[2] + ordered[3]) / 2  # between two gaps: no decision sits on the line
    p = 1 / (1 + math.exp(-cut))  # log(p / (1 - p)) == cut
    weighted = evaluate(
        model, EXAMPLES, Sentiment(), progress=False,
        choice_prior={"negative": p, "positive": 1 - p},
    )  # fmt: skip
    assert weighted["choices"] == ["positive" if g > cut else "negative" for g in gaps]
    assert weighted["choice_auc"] == pytest.approx(plain["choice_auc"])
    with pytest.raises(KMergeConfigError, match="each answer choice"):
        evaluate(model, EXAMPLES, Sentiment(), progress=False, choice_prior={"positive": 1.0})
    with pytest.raises(KMergeConfigError, match=r"in \(0, 1\]"):
        evaluate(
            model, EXAMPLES, Sentiment(), progress=False,
            choice_prior={"negative": 0.0, "positive": 1.0},
        )  # fmt: skip


def test_class_prior_counts_answers():
    prior = class_prior(EXAMPLES, ("negative", "positive"))  # 2 negative, 3 positive, add-one
    assert prior == pytest.approx({"negative": 3 / 7, "positive": 4 / 7})
    assert class_prior(EXAMPLES[:1], ("negative", "positive"))["negative"] == pytest.approx(1 / 3)
