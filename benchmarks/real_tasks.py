"""Amazon Reviews (K = 1, 2, 4, 8) and CommitPackFT (K = 1, 2, 4) on the embedded model.

    .venv/bin/python benchmarks/real_tasks.py --output-dir runs/real_tasks

Reads the local copies in ../shared/data (``--data-root``). Budgets are chosen to fit a 2-core
CPU in about 45 minutes in all; docs/results.md gives the measured table. Finished runs are
kept and skipped on a second invocation (delete ``runs/real_tasks/<task>/k<K>.json`` to redo).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from kmerge.task_benchmark import run_task_benchmark, write_results

BUDGETS = {
    # Reviews: 85% positive; prompts longer than 96 tokens keep head + tail (counted).
    "amazon_reviews": dict(
        ks=(1, 2, 4, 8),
        settings=dict(
            steps=30, batch_size=16, n_train=480, n_eval=200, eval_every=30, lr=3e-4,
            max_prompt_tokens=96, warmup_steps=3,
        ),
        data="amazon_reviews",
    ),
    # Code edits: commits whose old and new file fit in 1,200 characters (86 train, 19 test;
    # 48 of the train commits used);
    # loss and perplexity on the whole new file; greedy generation on 4 test commits.
    "commitpackft": dict(
        ks=(1, 2, 4),
        settings=dict(
            steps=12, batch_size=4, n_train=48, n_eval=19, eval_every=12, lr=3e-4,
            warmup_steps=1,
        ),
        options=dict(max_file_chars=1200, generate_n=4),
        data="commitpackft_python",
    ),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="amazon_reviews,commitpackft")
    parser.add_argument("--output-dir", default="runs/real_tasks")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    out = Path(args.output_dir)
    rows = []
    for task in args.tasks.split(","):
        budget = BUDGETS[task]
        data_dir = Path(args.data_root) / budget["data"]
        if not data_dir.is_dir():
            sys.exit(f"{data_dir} not found: pass --data-root (see ../shared/data/README.md)")
        options = {"data_dir": str(data_dir), **budget.get("options", {})}
        rows += run_task_benchmark(
            task, budget["ks"], out, command, task_options=options, **budget["settings"]
        )
        print(write_results(rows, out))
    print(f"\nresults in {out}/results.json, results.csv, table.md")


if __name__ == "__main__":
    main()
