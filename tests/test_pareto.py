"""The Pareto sweep: the frontier on hand-made points, aggregation over seeds, the plan, the
PNG, and `kmerge pareto` end to end on a tiny model (files, resume, checkpoint reuse)."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

import kmerge.pareto
from kmerge.cli import main
from kmerge.errors import KMergeConfigError
from kmerge.methods import METHODS
from kmerge.pareto import Point, SweepConfig, pareto_front, plan, plot, summarise

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_pareto_front_on_hand_made_points():
    points = [
        (1.0, 0.80),  # best metric
        (2.0, 0.70),  # (4, 0.70) compresses more at the same metric
        (2.0, 0.60),
        (4.0, 0.70),
        (4.0, 0.50),
        (8.0, 0.30),  # most compression; a tie with its twin, neither dominates
        (8.0, 0.30),
        (3.0, 0.65),  # dominated by (4, 0.70)
    ]
    assert pareto_front(points) == [True, False, False, True, False, True, True, False]


def test_pareto_front_when_lower_is_better():
    points = [(1.0, 10.0), (2.0, 12.0), (4.0, 11.0), (8.0, 30.0)]  # perplexity
    assert pareto_front(points, higher_is_better=False) == [True, False, True, True]
    assert pareto_front(points, higher_is_better=True) == [False, False, False, True]


def record(method, ratio, seed, value, compression, metric="accuracy"):
    return {
        "method": method,
        "target_ratio": ratio,
        "seed": seed,
        "tuned": True,
        "train_seconds": 10.0 + seed,
        "evaluation": {"primary_metric": metric, metric: value, "compression": compression},
    }


def test_summarise_aggregates_seeds_and_marks_the_frontier_on_the_means():
    records = [
        record("full", None, 0, 0.9, 1.0),
        record("kmerge", 4, 0, 0.7, 3.9),
        record("kmerge", 4, 1, 0.5, 3.9),
        record("random_drop", 4, 0, 0.55, 3.9),
        record("random_drop", 4, 1, 0.65, 3.9),
    ]
    summary = summarise(records, None, None)
    assert summary["metric"] == "accuracy" and summary["higher_is_better"]
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["kmerge"]["metric_mean"] == pytest.approx(0.6)
    assert rows["kmerge"]["metric_std"] == pytest.approx(0.1414, abs=1e-4)  # sample std
    assert rows["kmerge"]["seeds"] == [0, 1] and rows["kmerge"]["train_seconds_mean"] == 10.5
    assert rows["full"]["metric_std"] == 0.0
    # Means 0.60 (kmerge) and 0.60 (random_drop) tie at the same compression: both on it.
    assert [r["on_frontier"] for r in summary["rows"]] == [True, True, True]
    records[1]["evaluation"]["accuracy"] = 0.8
    rows = summarise(records, None, None)["rows"]
    assert [r["on_frontier"] for r in rows] == [True, True, False]


def test_summarise_perplexity_is_lower_is_better_and_unknown_metrics_fail():
    records = [record("full", None, 0, 5.0, 1.0, "perplexity"), record("kmerge", 4, 0, 9.0, 4)]
    records[1]["evaluation"] |= {"perplexity": 9.0}
    summary = summarise(records, None, None)
    assert summary["metric"] == "perplexity" and not summary["higher_is_better"]
    assert [r["on_frontier"] for r in summary["rows"]] == [True, True]
    with pytest.raises(KMergeConfigError, match="metric 'macro_f1' is not among"):
        summarise(records, "macro_f1", None)


def test_plan_orders_points_and_skips_unavailable_methods(monkeypatch):
    monkeypatch.setattr(METHODS["llmlingua2"], "unavailable_reason", lambda: "no model here")
    cfg = SweepConfig(
        methods=["kmerge", "full", "meta_tokens", "llmlingua2", "kmerge"],
        ratios=[2, 4],
        seeds=[0, 1],
    )
    points, skipped = plan(cfg)
    assert skipped == {"llmlingua2": "no model here"}
    assert [p.key for p in points] == [
        "kmerge-r2-s0", "kmerge-r2-s1", "kmerge-r4-s0", "kmerge-r4-s1",
        "full-s0", "full-s1", "meta_tokens-s0", "meta_tokens-s1",
    ]  # fmt: skip
    assert Point("random_drop", 2.5, 3).key == "random_drop-r2.5-s3"


def test_plot_writes_a_valid_png(tmp_path):
    rows = summarise(
        [record("full", None, 0, 0.9, 1.0), record("kmerge", 2, 0, 0.8, 1.9)]
        + [record("kmerge", 4, s, 0.6 + s / 10, 3.8) for s in (0, 1)],
        None,
        None,
    )["rows"]
    path = tmp_path / "plots" / "pareto.png"
    plot(path, rows, "accuracy", True, title="t")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert list(tmp_path.joinpath("plots").iterdir()) == [path]  # no temporary file left


# ---------------------------------------------------------------- the command, end to end
def sweep_args(tiny_dir, out, *extra):
    return [
        "pareto", "--base-model", str(tiny_dir), "--task", "tree", "--steps", "2",
        "--batch-size", "4", "--n-train", "16", "--n-eval", "4", "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def refuse_training(*args, **kwargs):
    raise AssertionError("a finished point was trained again")


def test_pareto_command_writes_results_and_resumes_without_retraining(
    tiny_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "sweep"
    args = sweep_args(tiny_dir, out, "--methods", "kmerge,random_drop", "--ratios", "2,4")
    main(args)
    table = capsys.readouterr().out
    assert "method | target ratio | compression | accuracy" in table

    results = json.loads((out / "results.json").read_text())
    points = {f"{p['method']}-r{p['target_ratio']:g}": p for p in results["points"]}
    assert sorted(points) == ["kmerge-r2", "kmerge-r4", "random_drop-r2", "random_drop-r4"]
    for ratio in (2, 4):
        merged, dropped = points[f"kmerge-r{ratio}"], points[f"random_drop-r{ratio}"]
        # Measured, not assumed: ceil(n / ratio) positions, the same for both methods.
        assert 0.8 * ratio < merged["evaluation"]["compression"] <= ratio
        assert dropped["evaluation"]["compression"] == merged["evaluation"]["compression"]
        for p in (merged, dropped):
            assert p["seed"] == 0 and p["tuned"] and p["steps"] == 2
            assert p["command"].startswith("kmerge pareto --base-model")
            assert p["train_config"]["model"]["k"] == (ratio if p is merged else 1)
    assert dropped["train_config"]["model"]["prompt_compressor"] == "random_drop"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,target_ratio,seeds,tuned,compression_mean")
    assert len(csv_lines) == 5
    assert (out / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE

    # Resume: every point is done, so nothing trains and no point file changes.
    before = {p.name: p.read_bytes() for p in (out / "points").iterdir()}
    monkeypatch.setattr(kmerge.pareto, "train", refuse_training)
    main(args)
    assert capsys.readouterr().out.count("done before, reused") == 4
    assert {p.name: p.read_bytes() for p in (out / "points").iterdir()} == before

    # A point whose result was lost but whose checkpoint exists is evaluated from it.
    lost = json.loads(before["kmerge-r4-s0.json"])
    (out / "points" / "kmerge-r4-s0.json").unlink()
    main(args)
    again = json.loads((out / "points" / "kmerge-r4-s0.json").read_text())
    for key in ("accuracy", "compression", "mean_positions_fed"):
        assert again["evaluation"][key] == lost["evaluation"][key]
    assert again["train_seconds"] == lost["train_seconds"]

    # The same directory with another budget is refused, not mixed in.
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--steps", "3"])  # the last --steps wins
    assert exit_info.value.code == 2
    assert "other settings (steps)" in capsys.readouterr().err
    # ... and so is a checkpoint trained with another budget.
    (out / "points" / "kmerge-r2-s0.json").unlink()
    with pytest.raises(SystemExit):
        main([*args, "--steps", "3"])
    assert "train_summary.json was computed with other settings (steps)" in capsys.readouterr().err


def test_untuned_baselines_are_evaluated_zero_shot(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(kmerge.pareto, "train", refuse_training)
    out = tmp_path / "zero-shot"
    main(sweep_args(tiny_dir, out, "--methods", "truncate_last", "--ratios", "2", "--no-tune"))
    (point,) = json.loads((out / "results.json").read_text())["points"]
    assert point["tuned"] is False and point["train_seconds"] == 0.0 and point["steps"] == 0
    assert point["checkpoint"] is None and not (out / "runs").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "nope"], "unknown method 'nope'; known methods:"),
        (["--methods", "kmerge", "--ratios", "2.5"], "must be a whole number; got 2.5"),
        (["--methods", "random_drop", "--ratios", "0.5"], "number >= 1, got 0.5"),
        (["--ratios", "2,x"], "--ratios takes comma-separated numbers, got '2,x'"),
        (["--seeds", "a"], "--seeds takes comma-separated numbers"),
    ],
)
def test_bad_sweeps_fail_before_any_training(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(kmerge.pareto, "train", refuse_training)
    with pytest.raises(SystemExit) as exit_info:
        main(sweep_args("unused-model", tmp_path / "s", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kmerge: error: ") and message in err and "\n" not in err


def test_protect_query_points_keep_the_tasks_question_raw(tiny_dir, tmp_path):
    from kmerge.pareto import point_train_config
    from kmerge.tasks.tree import TreeTask

    cfg = SweepConfig(methods=["kmerge_protect_query"], ratios=[4])
    cfg.train.task = "tree"
    (point,) = plan(cfg)[0]
    model = point_train_config(cfg, point).model
    assert model.protect_pattern == TreeTask.query_pattern
    assert model.k == 4 and model.block_alignment == "segments"
    segments = point_train_config(cfg, Point("kmerge_segments", 4, 0)).model
    assert segments.protect_pattern is None

    # Measured compression counts the raw question: less than the same merge of everything.
    out = tmp_path / "sweep"
    methods = "kmerge_segments,kmerge_protect_query"
    main(sweep_args(tiny_dir, out, "--methods", methods, "--ratios", "4"))
    points = json.loads((out / "results.json").read_text())["points"]
    compression = {p["method"]: p["evaluation"]["compression"] for p in points}
    assert 1.0 < compression["kmerge_protect_query"] < compression["kmerge_segments"]


def test_protect_query_on_a_task_without_a_question_fails_before_training(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(kmerge.pareto, "train", refuse_training)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a b c", "answer": "x"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "pareto",
                "--base-model",
                "unused-model",
                "--task",
                "jsonl",
                "--train-file",
                str(rows),
                "--eval-file",
                str(rows),
                "--methods",
                "kmerge_protect_query",
                "--ratios",
                "2",
                "--output-dir",
                str(tmp_path / "s"),
            ]  # fmt: skip
        )
    assert exit_info.value.code == 2
    assert "task 'jsonl' marks no question to keep raw" in capsys.readouterr().err


def test_a_point_from_before_a_new_setting_is_reused(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = sweep_args(tiny_dir, out, "--methods", "kmerge", "--ratios", "2")
    main(args)
    path = out / "points" / "kmerge-r2-s0.json"
    point = json.loads(path.read_text())
    # As an older kmerge wrote it: without settings that were added later at their default.
    del point["train_config"]["reconstruct_share"], point["train_config"]["model"]["merge_pooling"]
    path.write_text(json.dumps(point))
    monkeypatch.setattr(kmerge.pareto, "train", refuse_training)
    capsys.readouterr()
    main(args)
    assert "kmerge-r2-s0: done before, reused" in capsys.readouterr().out
