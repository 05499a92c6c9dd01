"""One short train + eval per task through the command line, on the tiny model: every task's
metrics, the measured compression and the exact command land in the results JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kmerge.cli import main
from tests.test_tasks import commit, review, write_jsonl


def run_json(capsys, argv: list[str]) -> dict:
    main(argv)
    return json.loads(capsys.readouterr().out)


def train_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--base-model", str(tiny_dir), "--k", "2", "--steps", "2", "--batch-size",
        "4", "--n-train", "8", "--n-eval", "4", "--eval-every", "2", "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def test_amazon_reviews_train_and_eval(tiny_dir, tmp_path, capsys):
    data = tmp_path / "reviews"
    long_text = " ".join(["the fabric is soft but the seams"] * 8)
    rows = [review(i, 5.0 if i % 2 else 1.0) | {"text": f"{long_text} {i}"} for i in range(12)]
    write_jsonl(data / "apparel_train.jsonl.gz", rows)
    write_jsonl(data / "apparel_test.jsonl.gz", rows[:4])
    out = tmp_path / "run"
    options = ["--task", "amazon_reviews", "--data-dir", str(data), "--max-prompt-tokens", "16"]
    main(train_args(tiny_dir, out, *options))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "amazon_reviews" and summary["k"] == 2
    final = summary["final_eval"]
    assert {"choice_accuracy", "accuracy", "macro_f1", "p_lf1"} <= set(final)
    assert final["primary_metric"] == "choice_accuracy"
    assert final["mean_prompt_tokens"] <= 16  # every prompt was cut to the budget
    # The console gets the summary; results.json adds the per-example outputs.
    assert "choices" not in final and "choice_nll" not in final
    saved = json.loads((out / "results.json").read_text())
    per_example = [saved["final_eval"].pop(key) for key in ("choices", "choice_nll")]
    assert [len(values) for values in per_example] == [4, 4]
    assert saved == summary
    assert "teacher_seconds" not in summary  # no teacher, no teacher cost
    data_record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["data"]
    assert data_record["prompts_cut"] == 8 + 4  # all training and held-out prompts are long

    result = run_json(
        capsys,
        ["eval", "--checkpoint", str(out / "checkpoint"), *options, "--n-eval", "4",
         "--output", str(tmp_path / "eval.json")],
    )  # fmt: skip
    assert result["task"] == "amazon_reviews" and result["k"] == 2 and result["n"] == 4
    assert result["prompts_cut"] == 4 and 1.5 < result["compression"] <= 2.0
    assert result["command"].startswith("kmerge eval --checkpoint")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["choices"]) == 4 and set(saved["choices"]) <= {"negative", "positive"}


def test_choice_prior_weighs_answers_by_their_training_frequency(tiny_dir, tmp_path, capsys):
    """--choice-prior train: the same per-choice losses, decided with the training rows' class
    frequencies (3 negative, 9 positive, add-one: 4/14 and 10/14) as priors."""
    data = tmp_path / "reviews"
    rows = [review(i, 1.0 if i % 4 == 0 else 5.0) for i in range(12)]
    write_jsonl(data / "apparel_train.jsonl.gz", rows)
    write_jsonl(data / "apparel_test.jsonl.gz", rows)
    out = tmp_path / "run"
    options = ["--task", "amazon_reviews", "--data-dir", str(data)]
    main(train_args(tiny_dir, out, *options, "--balance-classes", "--choice-prior", "train"))
    final = json.loads((out / "results.json").read_text())["final_eval"]
    assert 0 <= final["choice_auc"] <= 1 and len(final["choice_nll"]) == 4
    capsys.readouterr()
    saved = {}
    for prior in ("uniform", "train"):
        run_json(
            capsys,
            ["eval", "--checkpoint", str(out / "checkpoint"), *options, "--n-eval", "12",
             "--choice-prior", prior, "--output", str(tmp_path / f"{prior}.json")],
        )  # fmt: skip
        saved[prior] = json.loads((tmp_path / f"{prior}.json").read_text())
    log_prior = {"negative": math.log(4 / 14), "positive": math.log(10 / 14)}
    for nll, plain, weighted in zip(
        saved["uniform"]["choice_nll"], saved["uniform"]["choices"], saved["train"]["choices"]
    ):
        assert plain == min(nll, key=nll.get)
        assert weighted == min(nll, key=lambda c: nll[c] - log_prior[c])
    assert saved["train"]["choice_auc"] == pytest.approx(saved["uniform"]["choice_auc"])
    # The barely trained tiny model's loss gaps (~0.1) sit well inside log(10/4) ~ 0.9: the prior
    # must change decisions.
    assert saved["train"]["choices"] != saved["uniform"]["choices"]


def test_choice_prior_needs_answer_choices(tmp_path):
    from kmerge.errors import KMergeConfigError
    from kmerge.tasks import Example, Task
    from kmerge.training import TrainConfig, choice_prior

    class FreeText(Task):
        name = "free-text"

    train = [Example("a", "b")]
    assert choice_prior(TrainConfig(), FreeText(), train) is None
    with pytest.raises(KMergeConfigError, match="choice_prior='train' is for tasks with answer"):
        choice_prior(TrainConfig(choice_prior="train"), FreeText(), train)


def test_a_teachers_cost_lands_in_the_results(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_args(tiny_dir, out, "--teacher", "base"))
    capsys.readouterr()
    summary = json.loads((out / "results.json").read_text())
    # rounded to 0.1 s like train_seconds: the tiny teacher's few forwards may round to 0
    assert 0 <= summary["teacher_seconds"] <= summary["train_seconds"]


def test_commitpackft_train_and_eval(tiny_dir, tmp_path, capsys):
    data = tmp_path / "commits"
    rows = [commit(i, old=f"x = {i}\ny = 2\n", new=f"x = {i + 1}\ny = 2\n") for i in range(10)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "test.jsonl", rows[:3])
    out = tmp_path / "run"
    main(train_args(tiny_dir, out, "--task", "commitpackft", "--data-dir", str(data)))
    capsys.readouterr()
    result = run_json(
        capsys,
        ["eval", "--checkpoint", str(out / "checkpoint"), "--task", "commitpackft",
         "--data-dir", str(data), "--generate-n", "2", "--max-new-tokens", "6",
         "--reference-perplexity", "1000"],
    )  # fmt: skip
    assert result["primary_metric"] == "perplexity" and result["perplexity"] > 1
    assert result["n"] == 3 and result["n_generated"] == 2
    assert 0 <= result["edit_similarity"] <= 1 and result["accuracy"] == 0.0  # 6 tokens: cut
    assert result["p_lf1"] is not None  # P from the given reference perplexity


def test_csv_user_file_with_template_and_bad_rows(tiny_dir, tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text(
        "body,label\n"
        + "".join(f"sample text {i},{'yes' if i % 2 else 'no'}\n" for i in range(10))
        + ",no\n"  # empty body: a bad row
    )
    options = [
        "--train-file", str(path), "--eval-file", str(path), "--prompt-template",
        "Text: {body}. Answer:", "--answer-field", "label", "--answer-choices", "no,yes",
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        main(train_args(tiny_dir, tmp_path / "strict", *options))
    assert "rows.csv line 12" in capsys.readouterr().err
    out = tmp_path / "run"
    main(train_args(tiny_dir, out, *options, "--skip-bad-rows"))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "csv" and "macro_f1" in summary["final_eval"]
    data_record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["data"]
    assert data_record["bad_rows_skipped"] == 2  # once in the train file, once in the eval file
