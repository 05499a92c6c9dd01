"""Atomic writes and what results record about how they were made (kmerge.io,
kmerge.provenance)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from kmerge.io import atomic_directory, stored_json, write_csv, write_json
from kmerge.provenance import as_json, differences, machine_info, with_defaults


def test_write_json_and_csv_leave_only_the_finished_file(tmp_path):
    write_json(tmp_path / "a" / "r.json", {"x": (1, 2)})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": [1, 2]}
    write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}, {"b": 3, "c": 4}])
    with (tmp_path / "r.csv").open(newline="") as f:
        assert list(csv.reader(f)) == [["a", "b", "c"], ["1", "2", ""], ["", "3", "4"]]
    write_csv(tmp_path / "s.csv", [{"a": 1, "b": 2}], columns=["b"])
    assert (tmp_path / "s.csv").read_text().split() == ["b", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "r.csv", "s.csv"]


def test_stored_json_computes_once_and_checks_what_it_reuses(tmp_path):
    calls, checked = [], []
    path = tmp_path / "p.json"
    assert stored_json(path, lambda: calls.append(1) or {"v": 1}, checked.append) == {"v": 1}
    assert stored_json(path, lambda: calls.append(1) or {"v": 2}, checked.append) == {"v": 1}
    assert calls == [1] and checked == [{"v": 1}]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("killed")
    assert (target / "f").read_text() == "one"
    with atomic_directory(target) as tmp:
        (tmp / "g").write_text("two")
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or old directory left
    assert [p.name for p in target.iterdir()] == ["g"]


def test_settings_differences_name_each_leaf():
    saved = as_json({"model": {"k": 4, "r": 8}, "steps": 10, "ks": (1, 2)})
    assert saved["ks"] == [1, 2]
    now = {"model": {"k": 2, "r": 8}, "steps": 10, "ks": [1, 2], "new": True}
    assert differences(saved, now) == {"model.k": (4, 2), "new": (None, True)}
    assert differences(saved, saved) == {}


def test_settings_added_later_count_at_their_default():
    defaults = {"model": {"k": 1, "pooling": "mean"}, "steps": 300, "share": 0.0}
    old = {"model": {"k": 4}, "steps": 10}  # written before "pooling" and "share" existed
    filled = with_defaults(old, defaults)
    assert filled == {"model": {"k": 4, "pooling": "mean"}, "steps": 10, "share": 0.0}
    assert old == {"model": {"k": 4}, "steps": 10}  # not modified in place
    same = {"model": {"k": 4, "pooling": "mean"}, "steps": 10, "share": 0.0}
    assert differences(filled, same) == {}
    assert differences(filled, same | {"share": 0.25}) == {"share": (0.0, 0.25)}


def test_machine_info_names_the_software_and_the_device():
    info = machine_info(torch.device("cpu"), torch.float32)
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1
    assert (info["device"], info["dtype"]) == ("cpu", "float32")
    assert "device" not in machine_info()
