"""Record-to-example conversion for the real tasks and user files: label rule, templates, the
hub code path (run against a local folder with the hub's layout), bad rows, prompt cutting."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.tasks import (
    Example,
    build_task,
    check_stages,
    get_task,
    load_examples_file,
    task_stages,
)
from kmerge.tasks.amazon import review_label
from kmerge.tasks.base import ELISION, fit_prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def review(i: int, rating: float, asin: str | None = None) -> dict:
    return {"asin": asin or f"A{i}", "rating": rating, "title": "t", "text": f"review {i}"}


def commit(i: int, old: str = "x = 1\n", new: str = "x = 2\n") -> dict:
    return {
        "commit": f"c{i}",
        "old_file": "a.py",
        "new_file": "a.py",
        "old_contents": old,
        "new_contents": new,
        "subject": f"Change x {i}",
        "message": "m",
        "lang": "Python",
        "license": "mit",
        "repos": "r",
    }


# ---------------------------------------------------------------- amazon_reviews
@pytest.mark.parametrize(
    "rating, label", [(1, "negative"), (2, "negative"), (3, "negative"), (3.5, "positive"),
                      (4, "positive"), (5, "positive")],
)  # fmt: skip
def test_review_label_rule(rating, label):
    assert review_label(rating) == label


def test_amazon_local_files(tmp_path):
    write_jsonl(tmp_path / "x_train.jsonl.gz", [review(0, 5.0), review(1, 1.0), review(2, 4.0)])
    write_jsonl(tmp_path / "x_test.jsonl", [review(3, 2.0)])
    task = get_task("amazon_reviews", data_dir=str(tmp_path))
    train = task.examples("train")
    assert sorted((e.prompt, e.answer) for e in train) == [
        ("Review: review 0, Label:", "positive"),
        ("Review: review 1, Label:", "negative"),
        ("Review: review 2, Label:", "positive"),
    ]
    assert task.examples("test") == [Example("Review: review 3, Label:", "negative")]
    assert task.answer_choices == ("negative", "positive")
    assert task.primary_metric == "choice_accuracy" and "macro_f1" in task.metrics


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"rating": 5.0}, 'no "text" field'),
        ({"text": "   ", "rating": 5.0}, '"text" is empty'),
        ({"text": "ok"}, 'no "rating" field'),
        ({"text": "ok", "rating": "five"}, '"rating" must be a number'),
        ({"text": "ok", "rating": 9}, "between 1 and 5"),
    ],
)
def test_amazon_bad_rows_name_the_line(tmp_path, row, problem):
    write_jsonl(tmp_path / "train.jsonl", [review(0, 5.0), row])
    task = get_task("amazon_reviews", data_dir=str(tmp_path))
    with pytest.raises(KMergeDataError, match=f"train.jsonl line 2: .*{problem}"):
        task.examples("train")


def test_amazon_hub_path_on_a_local_folder_with_the_hub_layout(tmp_path):
    """The hub loader (datasets.load_dataset with the repository's raw file) run offline
    against a folder laid out like McAuley-Lab/Amazon-Reviews-2023. Without a test file, the
    rows are cut by product: no product on both sides, nothing lost, the same cut every time."""
    rows = [review(i, 5.0 if i % 3 else 1.0) | {"parent_asin": f"P{i % 40}"} for i in range(400)]
    write_jsonl(tmp_path / "raw" / "review_categories" / "Amazon_Fashion.jsonl", rows)
    task = get_task("amazon_reviews", hub_id=str(tmp_path), test_fraction=0.25)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 400 and 0 < len(test) < 200
    product = {f"review {i}": f"P{i % 40}" for i in range(400)}
    products = [{product[e.prompt[8:-8]] for e in split} for split in (train, test)]
    assert not products[0] & products[1]
    again = get_task("amazon_reviews", hub_id=str(tmp_path), test_fraction=0.25)
    assert sorted(e.prompt for e in again.examples("test")) == sorted(e.prompt for e in test)


def test_hub_failure_is_one_clear_error(tmp_path):
    task = get_task("amazon_reviews", hub_id=str(tmp_path / "nowhere"))
    with pytest.raises(KMergeDataError, match="cannot load .*--data-dir"):
        task.examples("train")


@pytest.mark.skipif(not (SHARED / "amazon_reviews").is_dir(), reason="../shared/data absent")
def test_amazon_shared_data():
    task = get_task("amazon_reviews", data_dir=str(SHARED / "amazon_reviews"))
    test = task.examples("test")
    assert len(test) == 1000
    positive = sum(e.answer == "positive" for e in test) / len(test)
    assert 0.75 < positive < 0.95  # the README's "about 85% positive"
    assert all(e.prompt.startswith("Review: ") and e.prompt.endswith(", Label:") for e in test)


# ---------------------------------------------------------------- commitpackft
def test_commitpack_template(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [commit(0, old="a = 1\n", new="a = 2\n")])
    (example,) = get_task("commitpackft", data_dir=str(tmp_path)).examples("train")
    assert example.prompt == (
        "Update the old python code content based on the instructions.\n"
        "Old Content: a = 1\n\n"
        "Instructions: Change x 0\n"
        "New Content:"
    )
    assert example.answer == "a = 2\n"


def test_commitpack_empty_old_file_is_allowed_but_empty_new_file_is_not(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [commit(0, old=""), commit(1, new="")])
    task = get_task("commitpackft", data_dir=str(tmp_path))
    with pytest.raises(KMergeDataError, match='line 2: "new_contents" is empty'):
        task.examples("train")
    skipping = get_task("commitpackft", data_dir=str(tmp_path), skip_bad_rows=True)
    assert len(skipping.examples("train")) == 1 and skipping.skipped_rows == 1


def test_commitpack_max_file_chars_filters_and_counts(tmp_path):
    rows = [commit(0), commit(1, old="y" * 50), commit(2, new="z" * 50)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    task = get_task("commitpackft", data_dir=str(tmp_path), max_file_chars=20)
    assert [e.meta["commit"] for e in task.examples("train")] == ["c0"]
    assert task.filtered_rows == 2


def test_commitpack_hub_path_on_a_local_folder(tmp_path):
    write_jsonl(tmp_path / "data" / "python" / "data.jsonl", [commit(i) for i in range(60)])
    task = get_task("commitpackft", hub_id=str(tmp_path), test_fraction=0.3)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 60 and test
    assert not {e.meta["commit"] for e in train} & {e.meta["commit"] for e in test}


@pytest.mark.skipif(not (SHARED / "commitpackft_python").is_dir(), reason="../shared/data absent")
def test_commitpack_shared_data():
    task = get_task("commitpackft", data_dir=str(SHARED / "commitpackft_python"))
    assert len(task.examples("train")) == 924 and len(task.examples("test")) == 150


# ---------------------------------------------------------------- user files
def test_jsonl_task_with_template_and_choices(tmp_path):
    rows = [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    task = get_task(
        "jsonl",
        train_file=str(path),
        eval_file=str(path),
        prompt_template="Text: {text}. Sentiment:",
        answer_field="label",
        answer_choices=["neg", "pos"],
    )
    assert sorted(e.prompt for e in task.examples("test")) == [
        "Text: awful. Sentiment:",
        "Text: great. Sentiment:",
    ]
    assert task.metrics == ("accuracy", "choice_accuracy", "macro_f1")


def test_template_naming_a_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "answer": "b"}])
    task = get_task("jsonl", train_file=str(path), prompt_template="{body}")
    with pytest.raises(KMergeDataError, match="d.jsonl line 1: row has no 'body' field"):
        task.examples("train")


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_task_reads_quoted_multiline_fields(tmp_path):
    path = write_csv(tmp_path / "d.csv", [["prompt", "answer"], ["a,\nb", "c"], ["d", "e"]])
    task = get_task("csv", train_file=str(path))
    assert sorted(task.examples("train"), key=lambda e: e.prompt) == [
        Example("a,\nb", "c"),
        Example("d", "e"),
    ]


@pytest.mark.parametrize(
    "body, problem",
    [
        (b'prompt,answer\nx,y\n"",z\n', '"prompt" is empty'),
        (b"prompt,answer\nx,y\nonly-prompt\n", 'no "answer" field'),
        (b"prompt,answer\nx,y\nq,\xff\xfe\n", "not valid UTF-8"),
        (b"prompt,answer\nx,y\na,b,c\n", "more fields than the header"),
    ],
)
def test_csv_bad_rows(tmp_path, body, problem):
    path = tmp_path / "d.csv"
    path.write_bytes(body)
    with pytest.raises(KMergeDataError, match=f"d.csv line 3: .*{problem}"):
        load_examples_file(path)
    loaded = load_examples_file(path, skip_bad_rows=True)
    assert loaded.examples == [Example("x", "y")] and loaded.skipped == 1
    assert "line 3" in loaded.first_error


def test_jsonl_skip_bad_rows_counts_every_kind(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "answer": "b"}\n'
        b"{broken\n"
        b'{"prompt": "\xff", "answer": "b"}\n'
        b'{"prompt": "", "answer": "b"}\n'
        b'{"prompt": "c", "answer": "d"}\n'
    )
    loaded = load_examples_file(path, skip_bad_rows=True)
    assert [e.prompt for e in loaded.examples] == ["a", "c"] and loaded.skipped == 3


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(KMergeDataError, match=r"no examples \(1 bad rows skipped"):
        load_examples_file(path, skip_bad_rows=True)


def test_file_task_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(KMergeDataError, match="reads csv files.*use --task jsonl"):
        get_task("csv", train_file=str(path))
    with pytest.raises(KMergeDataError, match="no test data: pass --eval-file"):
        get_task("jsonl", train_file=str(path)).examples("test")
    with pytest.raises(KMergeDataError, match="need answer_choices"):
        get_task("jsonl", train_file=str(path), metrics=["macro_f1"])
    with pytest.raises(KMergeDataError, match="does not take data_dir; its options"):
        get_task("tree", data_dir=str(tmp_path))


def test_tasks_answer_for_their_stages_splits_and_run_settings(tmp_path):
    assert task_stages("tree")[0] == "small" and task_stages("jsonl") == ()
    assert task_stages("nope") == ()  # building it names the known tasks
    check_stages("tree", ["small", "medium"])
    with pytest.raises(KMergeConfigError, match="unknown tree stage 'huge'; known: small"):
        check_stages("tree", ["huge"])
    with pytest.raises(KMergeConfigError, match="task 'jsonl' has no stages.*: tree"):
        check_stages("jsonl", ["small"])
    tree = build_task("tree", seed=3, stage="medium", n_eval=5, n_train=7)
    assert (tree.stage, tree.seed, tree.n_test, tree.n_train) == ("medium", 3, 5, 7)
    assert build_task("tree", 0, "small", 5).n_train == 2048  # the task's own default
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    files = build_task("jsonl", 1, "small", 5, options={"train_file": str(path)})
    assert files.has_split("train") and not files.has_split("test") and tree.has_split("test")
    assert files.filtered_rows == 0 and tree.filtered_rows == 0


# ---------------------------------------------------------------- --max-prompt-tokens
def test_fit_prompts_keeps_head_and_tail_within_budget(tokenizer):
    long = Example("Review: " + " ".join(f"word{i}" for i in range(300)) + ", Label:", "x")
    short = Example("Review: fine, Label:", "y")
    out, n_cut = fit_prompts([long, short], tokenizer, 40)
    assert n_cut == 1 and out[1] == short
    ids = tokenizer(out[0].prompt, add_special_tokens=False)["input_ids"]
    assert 36 <= len(ids) <= 40
    assert out[0].prompt.startswith("Review: word0 word1")
    assert out[0].prompt.endswith("word299, Label:") and ELISION in out[0].prompt
    assert out[0].meta["prompt_cut"] and out[0].answer == "x"
    assert fit_prompts([long], tokenizer, None) == ([long], 0)
    with pytest.raises(KMergeDataError, match="max_prompt_tokens must be >="):
        fit_prompts([long], tokenizer, 2)
