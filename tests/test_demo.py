"""The demo recipe on a tiny local model: the same settings for every K (K=4 adds the merged
recipe), a table, a JSON file."""

from __future__ import annotations

import dataclasses
import json

from kmerge.demo import MERGED_RECIPE, demo_configs, run_demo


def test_demo_configs_differ_only_in_k_and_the_merged_recipe():
    a, b = demo_configs((1, 4), n_eval=64)
    assert (a.model.k, b.model.k) == (1, 4) and (a.n_eval, b.n_eval) == (64, 64)
    assert a.teacher is None and a.lr == 3e-4  # K=1: no teacher, its own measured lr
    assert {name: getattr(b, name) for name in MERGED_RECIPE} == MERGED_RECIPE
    a.model.k = b.model.k
    a.model.base_fingerprint = b.model.base_fingerprint
    assert dataclasses.replace(a, **MERGED_RECIPE) == b


def test_run_demo_writes_table_and_json(tmp_path, tiny_dir, capsys):
    rows = run_demo(
        tmp_path / "demo",
        ks=(1, 4),
        model={"base_model": str(tiny_dir)},
        steps=2,
        batch_size=2,
        n_train=8,
        n_eval=4,
        eval_every=2,
        progress=False,
    )
    assert [r["k"] for r in rows] == [1, 4]
    assert rows[0]["compression"] == 1.0 and rows[1]["compression"] > 2.0
    out = capsys.readouterr().out
    assert "K-Token Merging" in out and "uncompressed LoRA" in out
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["k"] for r in saved["rows"]] == [1, 4] and saved["table"] in out
    assert (tmp_path / "demo" / "k4" / "checkpoint" / "encoder.safetensors").is_file()


def test_demo_cli_passes_overrides(monkeypatch, tmp_path):
    """`kmerge demo --block-alignment segments --ks 4 --steps 3` reaches run_demo as overrides."""
    import kmerge.demo
    from kmerge.cli import main

    seen = {}
    monkeypatch.setattr(kmerge.demo, "run_demo", lambda out, ks, **kw: seen.update(ks=ks, **kw))
    main(
        [
            "demo",
            "--output-dir",
            str(tmp_path),
            "--ks",
            "4",
            "--steps",
            "3",
            "--block-alignment",
            "segments",
        ]
    )
    assert seen == {"ks": (4,), "steps": 3, "model": {"block_alignment": "segments"}}
