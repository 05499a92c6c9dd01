"""User-file loading (JSON Lines here; CSV in test_tasks) and task registry errors: one line,
naming the file and the line."""

import gzip
import json

import pytest

from kmerge.tasks import Example, KMergeDataError, get_task, load_examples_file


def load_jsonl_examples(path, **kwargs):
    return load_examples_file(path, **kwargs).examples


ROWS = [{"prompt": "2+2=", "answer": "4", "id": 1}, {"prompt": "3+3=", "answer": "6"}]


def write_rows(path, rows, blank_between=False):
    sep = "\n\n" if blank_between else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_good_file(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", ROWS, blank_between=True)
    examples = load_jsonl_examples(path)
    assert examples == [Example("2+2=", "4"), Example("3+3=", "6")]
    # Other fields, and the row each came from (for errors found later), are in meta.
    assert examples[0].meta == {"id": 1, "where": f"{path} line 1"}
    assert examples[1].meta["where"] == f"{path} line 3"


def test_gz_file(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    assert [e.answer for e in load_jsonl_examples(path)] == ["4", "6"]


def test_custom_fields(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"q": "hi", "a": "there"}])
    assert load_jsonl_examples(path, prompt_field="q", answer_field="a") == [Example("hi", "there")]


def test_missing_answer_names_line(tmp_path):
    path = write_rows(tmp_path / "data.jsonl", ROWS + [{"prompt": "x"}])
    with pytest.raises(KMergeDataError, match=r'data\.jsonl line 3: row has no "answer" field'):
        load_jsonl_examples(path)


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "x", "answer": ', "not valid JSON"),
        ('["x", "y"]', "not a JSON object"),
        ('{"prompt": "", "answer": "y"}', '"prompt" is empty'),
        ('{"prompt": "x", "answer": 4}', '"answer" must be a string'),
    ],
)
def test_bad_rows(tmp_path, line, problem):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(KMergeDataError, match="line 2: .*" + problem) as err:
        load_jsonl_examples(path)
    assert "\n" not in str(err.value)


def test_non_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "\xff", "answer": "y"}\n')
    with pytest.raises(KMergeDataError, match="d.jsonl line 2: not valid UTF-8"):
        load_jsonl_examples(path)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(KMergeDataError, match="no examples"):
        load_jsonl_examples(path)


def test_bad_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(KMergeDataError, match="cannot read"):
        load_jsonl_examples(path)


def test_unknown_task():
    with pytest.raises(KMergeDataError, match=r"unknown task 'nope'; known tasks: .*tree"):
        get_task("nope")
