"""The Pareto sweep: quality vs measured compression for kmerge and its baselines.

Every (method, target ratio, seed) point is one :func:`kmerge.training.train` run (or, for an
untuned baseline, the base model as it is) evaluated by :func:`kmerge.evaluation.evaluate` on
the same held-out examples, all from one template :class:`TrainConfig`: same task, data,
budget and LoRA settings; only the method's model options, the seed and the run directory
change. Sweep directory layout::

    points/<method>-r<ratio>-s<seed>.json   one finished point (written atomically)
    runs/<method>-r<ratio>-s<seed>/         its training run (metrics.jsonl, checkpoint/)
    results.json  results.csv  pareto.png

Resuming: a point whose JSON exists is never recomputed; a point whose checkpoint exists is
evaluated from it without retraining. A finished point made with other settings is an error,
not a silent mix.
"""

from __future__ import annotations

import dataclasses
import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kmerge.errors import KMergeConfigError
from kmerge.evaluation import evaluate
from kmerge.io import atomic_write_bytes, stored_json, write_json
from kmerge.io import write_csv as write_csv_rows
from kmerge.methods import METHODS, get_method
from kmerge.modeling import CONFIG_FILE, KMergeModel
from kmerge.options import option
from kmerge.provenance import as_json, differences, with_defaults
from kmerge.reporting import markdown_table
from kmerge.tasks.base import query_pattern
from kmerge.training import TrainConfig, load_data, train

LOWER_IS_BETTER = frozenset({"perplexity"})
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
# TrainConfig fields a finished point may differ in without being a different experiment.
IGNORED_SETTINGS = ("output_dir", "overwrite", "progress", "eval_every", "log_every")  # logs only


@dataclass(frozen=True)
class Point:
    method: str
    ratio: float | None  # target ratio; None for methods that take none (full, meta_tokens)
    seed: int

    @property
    def key(self) -> str:
        ratio = "" if self.ratio is None else f"-r{self.ratio:g}"
        return f"{self.method}{ratio}-s{self.seed}"


@dataclass
class SweepConfig:
    """A sweep: ``train`` is the template run (task, data, budget, base model, LoRA)."""

    train: TrainConfig = option(cli=False, default_factory=TrainConfig)
    methods: list[str] = option(
        help="method names (kmerge, full, mean_pool, truncate_last, random_drop, stride_drop, "
        "self_information, meta_tokens, llmlingua2, ...)",
        default_factory=lambda: ["full", "kmerge"],
    )
    ratios: list[float] = option(
        help="target compression ratios", default_factory=lambda: [2, 4, 8]
    )
    seeds: list[int] = option(help="one point per seed", default_factory=lambda: [0])
    tune: bool = option(
        True, "LoRA-tune the token-level baselines on their compressed prompts (recorded)"
    )
    metric: str | None = option(None, "y axis (default: the task's primary metric)")
    higher_is_better: bool | None = option(
        None, "default: lower is better for perplexity, higher otherwise"
    )
    output_dir: str = option("runs/pareto", "points, runs, results, plot")
    command: str | None = option(None, cli=False)  # the invocation, recorded with every point

    def __post_init__(self) -> None:
        if not self.methods:
            raise KMergeConfigError("the sweep needs at least one method")
        if not self.seeds:
            raise KMergeConfigError("the sweep needs at least one seed")
        for name in self.methods:
            if name not in METHODS:
                known = ", ".join(sorted(METHODS))
                raise KMergeConfigError(f"unknown method {name!r}; known methods: {known}")
        if not self.ratios and any(METHODS[m].takes_ratio for m in self.methods):
            raise KMergeConfigError("the sweep needs at least one ratio")


def plan(cfg: SweepConfig) -> tuple[list[Point], dict[str, str]]:
    """The points to compute, in order, and the methods skipped here with the reason why.

    Every point's model options are built now, so a bad ratio (kmerge at 2.5) fails before
    any training."""
    points, skipped = [], {}
    for method in dict.fromkeys(cfg.methods):
        cls = METHODS[method]
        reason = cls.unavailable_reason()
        if reason:
            skipped[method] = reason
            continue
        ratios = list(dict.fromkeys(cfg.ratios)) if cls.takes_ratio else [None]
        for ratio in ratios:
            for seed in dict.fromkeys(cfg.seeds):
                point = Point(method, ratio, seed)
                point_train_config(cfg, point)
                points.append(point)
    return points, skipped


def point_train_config(cfg: SweepConfig, point: Point) -> TrainConfig:
    """The template run with this point's method options, seed and run directory."""
    options = get_method(point.method, point.ratio, point.seed).model_options()
    if METHODS[point.method].protects_query:
        options["protect_pattern"] = query_pattern(cfg.train.task)
    model = dataclasses.replace(cfg.train.model, **options)
    run_dir = Path(cfg.output_dir) / "runs" / point.key
    # A half-finished point is trained again from the start (run_point), so it writes no
    # resumable checkpoints that nothing would read.
    return dataclasses.replace(
        cfg.train, model=model, seed=point.seed, output_dir=str(run_dir), save_every=0
    )


def is_tuned(cfg: SweepConfig, point: Point) -> bool:
    return cfg.tune or not METHODS[point.method].tune_optional


def run_point(cfg: SweepConfig, point: Point) -> dict:
    """Train (or reuse the checkpoint of) one point and evaluate it; returns its record."""
    train_cfg, tuned = point_train_config(cfg, point), is_tuned(cfg, point)
    settings = _settings(train_cfg)
    run_dir = Path(train_cfg.output_dir)
    checkpoint, summary_file = run_dir / "checkpoint", run_dir / "train_summary.json"
    evaluation = None
    if not tuned:
        model = KMergeModel.from_base(train_cfg.model.base_model, train_cfg.model)
        summary = {"train_seconds": 0.0, "steps": 0}
    elif (checkpoint / CONFIG_FILE).is_file() and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        _check_same_settings(summary.pop("train_config"), settings, summary_file)
        model = KMergeModel.from_pretrained(checkpoint)
    else:  # the point's own directory: a half-finished attempt is replaced
        result = train(dataclasses.replace(train_cfg, overwrite=True))
        model, evaluation = result.model, result.final_eval
        summary = {"train_seconds": result.train_seconds, "steps": result.steps}
        write_json(summary_file, summary | {"train_config": settings})
    if evaluation is None:  # train evaluates its final weights on these same examples
        data = load_data(train_cfg, model.tokenizer)
        evaluation = evaluate(
            model, data.held_out, data.task, progress=train_cfg.progress,
            choice_prior=data.choice_prior,
        )  # fmt: skip
    scalars = {k: v for k, v in evaluation.items() if isinstance(v, (int, float, str))}
    return {
        "method": point.method,
        "target_ratio": point.ratio,
        "seed": point.seed,
        "tuned": tuned,
        "exact_ratio": METHODS[point.method].exact_ratio,
        **summary,
        "evaluation": scalars,
        "command": cfg.command,
        "train_config": settings,
        "checkpoint": str(checkpoint) if tuned else None,
    }


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Compute every missing point, then write results.json, results.csv and pareto.png.

    Returns the results.json payload. ``log`` receives one line per point and the table."""
    out = Path(cfg.output_dir)
    points, skipped = plan(cfg)
    for method, reason in skipped.items():
        log(f"skipping {method}: {reason}")
    records = []
    for i, point in enumerate(points, start=1):
        path, name = out / "points" / f"{point.key}.json", f"[{i}/{len(points)}] {point.key}"

        def reuse(record: dict, point: Point = point, path: Path = path, name: str = name) -> None:
            then = record["train_config"] | {"tune": record["tuned"]}
            now = _settings(point_train_config(cfg, point)) | {"tune": is_tuned(cfg, point)}
            _check_same_settings(then, now, path)
            log(f"{name}: done before, reused")

        def compute(point: Point = point, name: str = name) -> dict:
            log(f"{name}: running")
            return run_point(cfg, point)

        records.append(stored_json(path, compute, reuse))
    summary = summarise(records, cfg.metric, cfg.higher_is_better)
    payload = {
        "task": cfg.train.task,
        "metric": summary["metric"],
        "higher_is_better": summary["higher_is_better"],
        "command": cfg.command,
        "summary": summary["rows"],
        "points": records,
        "skipped": skipped,
    }
    write_json(out / "results.json", payload)
    write_csv(out / "results.csv", summary["rows"])
    title = f"{cfg.train.task}: quality vs compression"
    plot(out / "pareto.png", summary["rows"], summary["metric"], summary["higher_is_better"], title)
    log(format_table(summary["rows"], summary["metric"]))
    return payload


# ---------------------------------------------------------------- aggregation and the frontier
def pareto_front(
    points: Sequence[tuple[float, float]], higher_is_better: bool = True
) -> list[bool]:
    """Which (compression, metric) points are on the Pareto frontier: no other point has at
    least as much compression and an at least as good metric, and more of one of them.
    Compression is always maximised; the metric is minimised when not ``higher_is_better``."""
    sign = 1 if higher_is_better else -1
    # Rounded so that means that differ only by float error (0.6 vs 0.6000000000000001) tie.
    scored = [(round(x, 9), round(sign * y, 9)) for x, y in points]
    return [
        not any(
            xo >= x and yo >= y and (xo > x or yo > y)
            for j, (xo, yo) in enumerate(scored)
            if j != i
        )
        for i, (x, y) in enumerate(scored)
    ]


def summarise(records: list[dict], metric: str | None, higher_is_better: bool | None) -> dict:
    """One row per (method, target ratio): mean and spread over seeds, and the frontier."""
    if not records:
        raise KMergeConfigError("the sweep computed no points (every method was skipped)")
    metric = metric or records[0]["evaluation"]["primary_metric"]
    for record in records:
        if metric not in record["evaluation"]:
            available = sorted(k for k, v in record["evaluation"].items() if isinstance(v, float))
            raise KMergeConfigError(
                f"metric {metric!r} is not among the evaluation's metrics: {', '.join(available)}"
            )
    if higher_is_better is None:
        higher_is_better = metric not in LOWER_IS_BETTER
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["target_ratio"]), []).append(record)
    rows = []
    for (method, ratio), group in groups.items():
        values = {
            "compression": [r["evaluation"]["compression"] for r in group],
            "metric": [r["evaluation"][metric] for r in group],
            "train_seconds": [r["train_seconds"] for r in group],
        }
        row = {"method": method, "target_ratio": ratio, "seeds": [r["seed"] for r in group]}
        row["tuned"] = group[0]["tuned"]
        for name, xs in values.items():
            row[f"{name}_mean"] = statistics.fmean(xs)
            row[f"{name}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append(row)
    front = pareto_front(
        [(r["compression_mean"], r["metric_mean"]) for r in rows], higher_is_better
    )
    for row, on_front in zip(rows, front):
        row["on_frontier"] = on_front
    return {"metric": metric, "higher_is_better": higher_is_better, "rows": rows}


# ---------------------------------------------------------------- outputs
CSV_COLUMNS = (
    "method", "target_ratio", "seeds", "tuned", "compression_mean", "compression_std",
    "metric_mean", "metric_std", "train_seconds_mean", "train_seconds_std", "on_frontier",
)  # fmt: skip


def write_csv(path: Path, rows: list[dict]) -> None:
    rows = [row | {"seeds": " ".join(str(s) for s in row["seeds"])} for row in rows]
    write_csv_rows(path, rows, CSV_COLUMNS)


def format_table(rows: list[dict], metric: str) -> str:
    """A Markdown table, frontier points starred."""
    header = ["method", "target ratio", "compression", metric, "train s", "seeds", "frontier"]
    cells = []
    for r in rows:
        spread = f" ± {r['metric_std']:.3f}" if len(r["seeds"]) > 1 else ""
        ratio = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}"
        cells.append(
            [
                f"{r['method']}{'' if r['tuned'] else ' (untuned)'}",
                ratio,
                f"{r['compression_mean']:.2f}x",
                f"{r['metric_mean']:.3f}{spread}",
                f"{r['train_seconds_mean']:.0f}",
                str(len(r["seeds"])),
                "*" if r["on_frontier"] else "",
            ]
        )
    return markdown_table(header, cells)


def plot(
    path: Path, rows: list[dict], metric: str, higher_is_better: bool, title: str = ""
) -> None:
    """Metric vs measured compression: one marker per method, error bars = the spread over
    seeds, frontier points ringed and joined."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        mine = sorted(
            (r for r in rows if r["method"] == method), key=lambda r: r["compression_mean"]
        )
        ax.errorbar(
            [r["compression_mean"] for r in mine],
            [r["metric_mean"] for r in mine],
            xerr=[r["compression_std"] for r in mine],
            yerr=[r["metric_std"] for r in mine],
            fmt=MARKERS[i % len(MARKERS)] + "-",  # a method's ratios joined, in order
            linewidth=0.8,
            markersize=7,
            capsize=3,
            label=method,
        )
    front = sorted((r for r in rows if r["on_frontier"]), key=lambda r: r["compression_mean"])
    fx, fy = [r["compression_mean"] for r in front], [r["metric_mean"] for r in front]
    ax.plot(fx, fy, "k--", linewidth=1, zorder=0)
    ax.scatter(fx, fy, s=220, facecolors="none", edgecolors="k", label="Pareto frontier")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("measured compression (prompt tokens / positions fed)")
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())


# ---------------------------------------------------------------- files
def _settings(train_cfg: TrainConfig) -> dict:
    """The run's settings as JSON values, without the ones that do not change the result."""
    data = as_json(train_cfg.to_dict())
    for name in IGNORED_SETTINGS:
        data.pop(name, None)
    return data


def _check_same_settings(then: dict, now: dict, path: Path) -> None:
    changed = list(differences(with_defaults(then, _settings(TrainConfig())), now))
    if changed:
        raise KMergeConfigError(
            f"{path} was computed with other settings ({', '.join(changed)}); "
            "use another --output-dir, or the settings it was made with"
        )
