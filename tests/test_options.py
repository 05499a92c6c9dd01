"""One source for every setting: the CLI's flags, defaults and help texts come from the config
dataclasses (kmerge.options), so the two cannot drift."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Literal

import pytest

import kmerge.cli
from kmerge.bench import BenchConfig
from kmerge.cli import build_parser, main
from kmerge.errors import KMergeConfigError
from kmerge.modeling import KMergeConfig
from kmerge.options import check_values, flag, option
from kmerge.pareto import SweepConfig
from kmerge.serving.config import ServeConfig
from kmerge.tasks.base import TASKS
from kmerge.tasks.options import TaskOptions
from kmerge.training import TrainConfig

CONFIGS = (KMergeConfig, TrainConfig, SweepConfig, TaskOptions, BenchConfig, ServeConfig)


def cli_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_has_a_help_text(cls):
    for f in cli_fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_train_without_flags_is_the_dataclass_defaults():
    cfg = kmerge.cli._train_config(build_parser().parse_args(["train"]))
    expected = TrainConfig(output_dir="runs/train")  # the one default the CLI adds
    assert cfg == expected
    assert cfg.save_every == TrainConfig().save_every == 100  # they had drifted (100 vs 0)


def test_every_train_setting_is_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for cls in (KMergeConfig, TrainConfig, TaskOptions):
        for f in cli_fields(cls):
            assert flag(f.name) in help_text, f.name


def test_flags_reach_the_configs():
    argv = ["train", "--k", "4", "--lora-r", "4", "--no-append-eos", "--block-alignment",
            "segments", "--time-budget", "60", "--segment-chars", ";",
            "--merge-norm", "token", "--k-choices", "1,2", "--stage", "xsmall",
            "--budget-clock", "cpu", "--save-every", "7", "--no-progress", "--answer-choices",
            "yes, no", "--skip-bad-rows", "--data-dir", "d", "--task", "amazon_reviews",
            "--lora-target-modules", "q_proj,v_proj", "--mixed-precision", "bf16"]  # fmt: skip
    cfg = kmerge.cli._train_config(build_parser().parse_args(argv))
    m = cfg.model
    assert (m.k, m.lora_r, m.append_eos, m.merge_norm) == (4, 4, False, "token")
    assert m.segment_chars == ";"
    assert m.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.k_choices == [1, 2] and cfg.stage == "xsmall"
    assert (cfg.budget_clock, cfg.save_every, cfg.progress) == ("cpu", 7, False)
    assert cfg.mixed_precision == "bf16" and cfg.task == "amazon_reviews"
    assert cfg.task_options == {"answer_choices": ["yes", "no"], "skip_bad_rows": True,
                                "data_dir": "d"}  # fmt: skip


def test_ancestor_negatives_flag_reaches_the_tree_task():
    from kmerge.tasks import build_task

    argv = ["train", "--ancestor-negatives", "0.5", "--stage", "xsmall"]
    cfg = kmerge.cli._train_config(build_parser().parse_args(argv))
    assert cfg.task_options == {"ancestor_negatives": 0.5}
    task = build_task(cfg.task, cfg.seed, cfg.stage, cfg.n_eval, 64, cfg.task_options)
    assert task.ancestor_negatives == 0.5 and task.stage == "xsmall"


def test_the_merged_recipe_is_one_flag_and_each_of_its_settings_can_be_overridden():
    parse = build_parser().parse_args
    cfg = kmerge.cli._train_config(parse(["train", "--k", "4", "--recipe", "merged"]))
    recipe = (cfg.teacher, cfg.encoder_lr, cfg.distill_match_warmup, cfg.lr)
    assert recipe == ("base", 3e-3, 0.2, 6e-4)
    assert cfg.model.block_alignment == "segments" and cfg.model.k == 4
    assert cfg.distill_prompt_weight == 3.0  # the teacher's own defaults come with it
    argv = ["train", "--recipe", "merged", "--lr", "1e-3", "--block-alignment", "start"]
    cfg = kmerge.cli._train_config(parse(argv))
    assert (cfg.lr, cfg.model.block_alignment, cfg.teacher) == (1e-3, "start", "base")
    with pytest.raises(KMergeConfigError, match="--recipe merged is for K > 1"):
        kmerge.cli._train_config(parse(["train", "--k", "1", "--recipe", "merged"]))


def test_pareto_flags_make_the_sweep(monkeypatch):
    seen = {}
    monkeypatch.setattr("kmerge.pareto.run_sweep", lambda sweep: seen.setdefault("s", sweep))
    main(["pareto", "--methods", "kmerge,random_drop", "--ratios", "2,4", "--seeds", "0,1",
          "--no-tune", "--steps", "9", "--n-train", "16", "--output-dir", "out",
          "--time-budget", "30", "--budget-clock", "cpu"])  # fmt: skip
    sweep = seen["s"]
    assert (sweep.train.time_budget, sweep.train.budget_clock) == (30.0, "cpu")
    assert sweep.methods == ["kmerge", "random_drop"] and sweep.ratios == [2.0, 4.0]
    assert sweep.seeds == [0, 1] and sweep.tune is False and sweep.output_dir == "out"
    assert sweep.train.steps == sweep.train.eval_every == 9 and sweep.train.n_train == 16
    assert sweep.command.startswith("kmerge pareto")


def test_curriculum_is_a_comma_list():
    cfg = kmerge.cli._train_config(
        build_parser().parse_args(["train", "--curriculum", "small,xsmall"])
    )
    assert cfg.curriculum == ["small", "xsmall"]


def test_every_task_option_is_taken_by_some_task():
    taken = set()
    for cls in TASKS.values():
        taken |= set(inspect.signature(cls.__init__).parameters)
    for f in dataclasses.fields(TaskOptions):
        assert f.name in taken, f"no task takes {f.name}"


def test_generate_reads_its_batch_size(monkeypatch, capsys):
    sizes = []

    class Model:
        def generate(self, prompts, max_new_tokens, k=None):
            sizes.append(len(prompts))
            return [p.upper() for p in prompts]

    monkeypatch.setattr(kmerge.cli, "_load", lambda args: Model())
    prompts = [arg for p in "abcde" for arg in ("--prompt", p)]
    main(["generate", "--batch-size", "2", *prompts])
    assert sizes == [2, 2, 1]
    assert capsys.readouterr().out.split() == list("ABCDE")


def test_bench_flags_make_the_bench_config(monkeypatch):
    seen = {}
    monkeypatch.setattr("kmerge.bench.run_bench", lambda cfg: seen.setdefault("cfg", cfg))
    monkeypatch.setattr("kmerge.bench.format_tables", lambda result: "")
    main(["bench", "--lengths", "8,16", "--ks", "1,4", "--no-train", "--no-merge-lora"])
    cfg = seen["cfg"]
    assert cfg.lengths == (8, 16) and cfg.ks == (1, 4) and cfg.train is False
    assert cfg.merge_lora is False and cfg.generate is True and cfg.repeats == 5
    assert cfg.command.startswith("kmerge bench")


def test_serve_flags_make_the_serve_config(monkeypatch):
    seen = {}
    monkeypatch.setattr("kmerge.serving.server.serve", lambda cfg: seen.setdefault("cfg", cfg))
    main(["serve", "ckpt", "--port", "0", "--max-batch-size", "4", "--no-merge-lora"])
    cfg = seen["cfg"]
    assert (cfg.checkpoint, cfg.port, cfg.max_batch_size) == ("ckpt", 0, 4)
    assert cfg.merge_lora is False and cfg.host == "127.0.0.1" and cfg.backend == "local"


def test_serve_refuses_a_vllm_flag_without_the_vllm_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "ckpt", "--vllm-url", "http://127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert "--vllm-url applies only with --backend vllm" in capsys.readouterr().err


@dataclasses.dataclass
class _Ranged:
    count: int = option(1, "a count", minimum=1)
    port: int = option(80, "a port", minimum=0, maximum=65535)
    rate: float | None = option(None, "a rate", positive=True)
    mode: Literal["a", "b", "c"] = option("a", "a mode")

    def __post_init__(self) -> None:
        check_values(self)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": 0}, "count must be >= 1, got 0"),
        ({"port": 70000}, r"port must be in 0\.\.65535, got 70000"),
        ({"rate": 0.0}, "rate must be a positive number, got 0.0"),
        ({"rate": float("inf")}, "rate must be a positive number, got inf"),
        ({"mode": "d"}, "mode must be 'a', 'b' or 'c', got 'd'"),
    ],
)
def test_declared_ranges_and_choices_are_checked(values, message):
    with pytest.raises(KMergeConfigError, match=message):
        _Ranged(**values)


def test_values_inside_the_declared_ranges_pass():
    ranged = _Ranged(count=5, port=0, rate=1e-3, mode="c")
    assert (ranged.count, ranged.port, ranged.rate, ranged.mode) == (5, 0, 1e-3, "c")


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (TrainConfig, {"keep_checkpoints": 0}, "keep_checkpoints must be >= 1"),
        (BenchConfig, {"warmup": -1}, "warmup must be >= 0"),
        (ServeConfig, {"checkpoint": "x", "port": -1}, r"port must be in 0\.\.65535"),
        (ServeConfig, {"checkpoint": "x", "batch_wait_ms": -1.0}, "batch_wait_ms must be >= 0"),
        (KMergeConfig, {"merge_norm": "l2"}, "merge_norm must be 'mean', 'token' or 'centered'"),
    ],
)
def test_every_config_checks_its_declared_ranges(cls, values, message):
    with pytest.raises(KMergeConfigError, match=message):
        cls(**values)
