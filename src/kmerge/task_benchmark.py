"""The real-task benchmark recipe: train and evaluate one task at several K, same budget.

Every K gets the same data, seed, steps and batch; K = 1 is the uncompressed LoRA baseline.
Each finished run is stored as ``<output_dir>/<task>/k<K>.json`` (an interrupted benchmark
resumes where it stopped); the table (markdown), ``results.json`` and ``results.csv`` are
rewritten from all stored runs. P-LF1 for perplexity uses the K = 1 run as the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from kmerge.evaluation import split_per_example
from kmerge.io import atomic_write_text, stored_json, write_csv, write_json
from kmerge.metrics import p_lf1, perplexity_performance
from kmerge.modeling import KMergeConfig
from kmerge.provenance import machine_info
from kmerge.reporting import markdown_table
from kmerge.training import TrainConfig, train

METRIC_COLUMNS = ("choice_accuracy", "accuracy", "macro_f1", "perplexity", "edit_similarity")


def train_row(cfg: TrainConfig, path: Path, command: str) -> dict:
    """Train and evaluate one (task, K) in the run directory next to its result ``path``."""
    # The point's own run directory: an unfinished attempt (no result file yet) is replaced,
    # so it writes no resumable checkpoints.
    run_dir = str(path.with_suffix(""))
    cfg = dataclasses.replace(cfg, output_dir=run_dir, overwrite=True, save_every=0)
    result = train(cfg)
    if result.final_eval is None:
        raise RuntimeError(f"{cfg.task}: no held-out data was evaluated")
    data = next(r["data"] for r in result.history if "data" in r)
    row = {
        "task": cfg.task,
        "k": cfg.model.k,
        "steps": result.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "train_seconds": result.train_seconds,
        **split_per_example(result.final_eval)[0],
        "data": data,
        "command": command,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return row


def add_reference_p_lf1(rows: list[dict]) -> None:
    """Fill P-LF1 for perplexity-headlined rows from the K = 1 row of the same task."""
    reference = {r["task"]: r["perplexity"] for r in rows if r["k"] == 1 and "perplexity" in r}
    for r in rows:
        if r["primary_metric"] == "perplexity" and r["task"] in reference:
            performance = perplexity_performance(r["perplexity"], reference[r["task"]])
            r["p_lf1"] = p_lf1(performance, max(0.0, r["length_reduction"]))


def format_table(rows: list[dict]) -> str:
    metrics = [m for m in METRIC_COLUMNS if any(m in r for r in rows)]
    header = ["task", "K", "prompt tokens", "positions fed", "compression", *metrics, "P-LF1"]
    table = []
    for r in rows:
        cells = [
            r["task"],
            str(r["k"]),
            f"{r['mean_prompt_tokens']:.1f}",
            f"{r['mean_positions_fed']:.1f}",
            f"{r['compression']:.2f}x",
        ]
        for m in metrics:
            value = r.get(m)
            cells.append(
                "-"
                if value is None
                else f"{value:.2f}"
                if m == "perplexity"
                else f"{100 * value:.1f}%"
            )
        cells.append("-" if r.get("p_lf1") is None else f"{r['p_lf1']:.3f}")
        cells.append(f"{r['train_seconds']:.0f}")
        table.append(cells)
    return markdown_table([*header, "train s"], table)


def write_results(rows: list[dict], output_dir: Path) -> str:
    """results.json, results.csv and table.md from the stored rows; returns the table."""
    add_reference_p_lf1(rows)
    table = format_table(rows)
    write_json(output_dir / "results.json", rows)
    atomic_write_text(output_dir / "table.md", table + "\n")
    write_csv(output_dir / "results.csv", [{k: v for k, v in r.items() if not isinstance(v, dict)}
                                           for r in rows])  # fmt: skip
    return table


def run_task_benchmark(
    task: str,
    ks: tuple[int, ...],
    output_dir: str | Path,
    command: str,
    model: dict | None = None,
    **settings,
) -> list[dict]:
    """One row per K for ``task``; ``settings`` are TrainConfig fields shared by every K."""
    output_dir = Path(output_dir)
    rows = []
    for k in ks:
        cfg = TrainConfig(model=KMergeConfig(k=k, **(model or {})), task=task, **settings)
        path = output_dir / task / f"k{k}.json"  # an interrupted benchmark reuses it
        rows.append(stored_json(path, functools.partial(train_row, cfg, path, command)))
    return rows
