"""Held-out metric against training seconds for finished `kmerge train` runs (docs/quality.md).

    .venv/bin/python benchmarks/quality_curves.py runs/q/k1-s0 runs/q/k4-s0 ... \\
        --labels "K=1,K=4" --output docs/img/quality-tree.png --table

Reads each run's metrics.jsonl (the eval records carry ``train_seconds``: optimisation time on
the run's budget clock, evaluation excluded) and results.json, draws one curve per run (runs
with the same label are averaged over the training seconds they share, each run interpolated
linearly between its evaluations, the spread shaded) and prints a markdown table
of the final metric, the measured compression and the training seconds (for a run stopped
before its end: its last evaluation).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from kmerge.reporting import markdown_table


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def eval_curve(run: Path, metric: str) -> list[tuple[float, float]]:
    return [
        (r["train_seconds"], r[f"eval_{metric}"]) for r in records(run) if f"eval_{metric}" in r
    ]


def mean_curve(
    curves: list[list[tuple[float, float]]],
) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """Mean, min and max of several runs' curves over the training seconds all of them cover.

    Runs evaluate at different seconds (and a time-budgeted run's final evaluation comes at
    its own step), so each curve is interpolated linearly onto the union of the runs'
    evaluation times inside the shared range; pairing points by index would average one
    run's mid-run evaluation with another's final one. None when the runs share no range.
    """
    start = max(c[0][0] for c in curves)
    end = min(c[-1][0] for c in curves)
    if start > end:
        return None
    xs = sorted({x for c in curves for x, _ in c if start <= x <= end})
    ys = np.array([np.interp(xs, [x for x, _ in c], [y for _, y in c]) for c in curves])
    return xs, ys.mean(0).tolist(), ys.min(0).tolist(), ys.max(0).tolist()


def final_row(run: Path, metric: str) -> dict:
    """The run's final evaluation; for a run without results.json (stopped before the end, or
    still running), its last mid-run evaluation, marked as such."""
    if (run / "results.json").exists():
        result = json.loads((run / "results.json").read_text())
        final, name = result["final_eval"], run.name
        steps, seconds = result["steps"], result["train_seconds"]
    else:
        rows = records(run)
        evals = [r for r in rows if f"eval_{metric}" in r]
        if not evals:
            raise SystemExit(f"{run}: no results.json and no evaluation in metrics.jsonl yet")
        last = evals[-1]
        # an eval record holds the final evaluation's keys, prefixed with eval_
        final = {k.removeprefix("eval_"): v for k, v in last.items() if k.startswith("eval_")}
        final["n"] = next((r["data"]["n_eval"] for r in rows if "data" in r), "?")
        name = f"{run.name} (no final evaluation; last at step {last['step']})"
        steps, seconds = last["step"], last["train_seconds"]
    return {
        "run": name,
        "metric": final[metric],
        "compression": final["compression"],
        "positions": final["mean_positions_fed"],
        "steps": steps,
        "train_seconds": seconds,
        "n": final["n"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", default=None, help="comma-separated, one per run")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--title", default="Textualized Tree (small), held-out")
    parser.add_argument("--output", type=Path, default=None, help="PNG path")
    parser.add_argument("--table", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")

    groups: dict[str, list[Path]] = defaultdict(list)
    for label, run in zip(labels, args.runs):
        groups[label].append(run)
    if args.table:
        cells = []
        for label, runs in groups.items():
            for run in runs:
                row = final_row(run, args.metric)
                cells.append([
                    label, row["run"], f"{100 * row['metric']:.1f}%", f"{row['compression']:.2f}x",
                    f"{row['positions']:.1f}", str(row["steps"]), f"{row['train_seconds']:.0f}",
                    str(row["n"]),
                ])  # fmt: skip
        header = ("variant", "run", args.metric, "compression", "positions fed", "steps",
                  "train s", "n")  # fmt: skip
        print(markdown_table(header, cells))
    if args.output:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, runs in groups.items():
            curves = [eval_curve(run, args.metric) for run in runs]
            averaged = mean_curve(curves) if len(runs) > 1 else None
            if averaged is None:  # one run, or runs without a shared range: one line each
                for run, curve in zip(runs, curves):
                    name = label if len(runs) == 1 else f"{label} ({run.name})"
                    ax.plot([x for x, _ in curve], [100 * y for _, y in curve], marker="o",
                            label=name)  # fmt: skip
                continue
            xs, mean, low, high = averaged
            (line,) = ax.plot(xs, [100 * y for y in mean], marker="o",
                              label=f"{label} (mean of {len(runs)} runs)")  # fmt: skip
            ax.fill_between(xs, [100 * y for y in low], [100 * y for y in high],
                            color=line.get_color(), alpha=0.2)  # fmt: skip
        ax.set_xlabel("training seconds (CPU time of the run, evaluation excluded)")
        ax.set_ylabel(f"held-out {args.metric} (%)")
        ax.set_title(args.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.output, dpi=120)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
