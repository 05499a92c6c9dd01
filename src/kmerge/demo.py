"""The demo recipe: K=4 merging vs the uncompressed K=1 LoRA baseline at equal training time.

Both runs train on the same Textualized Tree stage (fresh trees), with the same batch size,
seed, precision and schedule shape, for the same CPU training time (evaluation excluded; K=4
steps are cheaper, so it takes more of them), then are evaluated on the same held-out trees.
K=4 trains with the best measured merged recipe (prompt distillation, ``MERGED_RECIPE``), K=1
with its own measured settings. The table and the full results (with the training curves) are
written as JSON.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from kmerge.io import write_json
from kmerge.modeling import KMergeConfig
from kmerge.provenance import machine_info
from kmerge.reporting import markdown_table
from kmerge.training import MERGED_RECIPE, TrainConfig, train

COLUMNS = (
    "method", "K", "prompt tokens", "positions fed", "compression", "accuracy", "steps", "train s",
)  # fmt: skip


# What `make demo` runs: 600 CPU seconds of training for each K, the two runs side by side on
# one thread each (CPU time of the process: fair when other work shares the machine).
# Segment-aligned blocks: the steadiest K=4 layout at equal time over two seeds (quality.md).
# bf16 where the machine computes it natively (1.5-1.9x the steps per CPU-second here).
DEMO_SETTINGS = dict(
    stage="small", steps=5000, time_budget=600.0, budget_clock="cpu", batch_size=32, lr=3e-4,
    n_eval=256, eval_every=50, mixed_precision="auto",
    save_every=0,  # a second demo replaces the runs; nothing would resume from a checkpoint
)  # fmt: skip
# K>1 adds MERGED_RECIPE (kmerge.training).
DEMO_MODEL = dict(block_alignment="segments", lora_r=8, lora_alpha=16)


def demo_configs(ks: tuple[int, ...] = (1, 4), **overrides) -> list[TrainConfig]:
    """The demo's runs: one TrainConfig per K, identical except for K and, for K>1,
    ``MERGED_RECIPE`` (``overrides`` apply to every K, last)."""
    model_overrides = DEMO_MODEL | overrides.pop("model", {})
    return [
        TrainConfig(
            model=KMergeConfig(k=k, **model_overrides),
            **DEMO_SETTINGS | (MERGED_RECIPE if k > 1 else {}) | overrides,
        )
        for k in ks
    ]


def format_table(rows: list[dict]) -> str:
    cells = (
        [
            r["method"],
            str(r["k"]),
            f"{r['mean_prompt_tokens']:.1f}",
            f"{r['mean_positions_fed']:.1f}",
            f"{r['compression']:.2f}x",
            f"{100 * r['accuracy']:.1f}%",
            str(r["steps"]),
            f"{r['train_seconds']:.0f}",
        ]
        for r in rows
    )
    return markdown_table(COLUMNS, cells)


def train_row(cfg: TrainConfig, threads: int | None = None) -> dict:
    """Train one demo run and return its table row (with its curve). ``threads``: torch's CPU
    threads for this run (set in the worker process when runs go side by side)."""
    if threads is not None:
        torch.set_num_threads(threads)
    result = train(cfg)  # ends with an evaluation on the full held-out set
    final = result.final_eval
    return {
        "method": "uncompressed LoRA" if cfg.model.k == 1 else "K-Token Merging",
        "k": cfg.model.k,
        "stage": cfg.stage,
        "steps": result.steps,
        "batch_size": cfg.batch_size,
        "train_seconds": result.train_seconds,
        **{k: v for k, v in final.items() if k != "predictions"},
        "curve": [h for h in result.history if "eval_accuracy" in h],
    }


def run_demo(
    output_dir: str | Path = "runs/demo",
    ks: tuple[int, ...] = (1, 4),
    side_by_side: bool = True,
    **overrides,
) -> list[dict]:
    """Train and evaluate one model per K; print and save the comparison table.

    ``side_by_side``: the runs go at the same time, one process and one thread each, so that
    each run's CPU-time budget buys the same work (several threads of one process spin while
    they wait, and that time would count against its budget) and the demo takes the wall time
    of one run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    configs = [
        # The demo's own sub-directories: a second demo into the same folder replaces them.
        dataclasses.replace(cfg, output_dir=str(output_dir / f"k{cfg.model.k}"), overwrite=True)
        for cfg in demo_configs(ks, **overrides)
    ]
    if side_by_side and len(configs) > 1:
        # one progress bar (the last run's); two processes would draw over each other's line
        configs = [dataclasses.replace(c, progress=False) for c in configs[:-1]] + configs[-1:]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(configs), mp_context=context) as pool:
            rows = list(pool.map(train_row, configs, [1] * len(configs)))
    else:
        rows = [train_row(cfg) for cfg in configs]
    table = format_table(rows)
    print(
        f"\nTextualized Tree, stage {rows[0]['stage']}, batch {rows[0]['batch_size']}, the same "
        f"training time for each K, held-out n={rows[0]['n']}\n"
    )
    print(table)
    summary = {
        "rows": rows,
        "table": table,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(output_dir / "results.json", summary)
    print(f"\nresults written to {output_dir / 'results.json'}")
    return rows
