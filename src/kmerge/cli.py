"""The ``kmerge`` command line: train, eval, generate, demo, pareto, bench.

Every subcommand is a thin shell over the Python function of the same name; bad input ends
with one line ``kmerge: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from kmerge.errors import KMergeConfigError, KMergeError
from kmerge.models import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--base-model", default=DEFAULT_MODEL, help="embedded name, hub id or local dir")
    g.add_argument(
        "-k",
        "--k",
        type=int,
        default=None,
        help="block size K (1 = uncompressed; default 4). With --checkpoint: merge at this K, at "
        "most the checkpoint's (for a model trained with --k-choices)",
    )
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=int, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--encoder-layers", type=int, default=2)
    g.add_argument("--encoder-hidden-size", type=int, default=None)
    g.add_argument(
        "--block-alignment",
        choices=("start", "end", "segments"),
        default="start",
        help="how prompts are cut into blocks (see KMergeConfig)",
    )
    g.add_argument("--encoder-input-norm", action="store_true")
    g.add_argument("--prepend-bos", action="store_true")
    g.add_argument(
        "--merge-norm",
        choices=("mean", "token"),
        default="mean",
        help="token: rescale each block mean to its tokens' mean norm",
    )
    g = p.add_argument_group("protected spans: prompt tokens fed unmerged (counted as positions)")
    g.add_argument(
        "--protect-query",
        action="store_true",
        help="keep the task's question as ordinary tokens (the task's query_pattern)",
    )
    g.add_argument("--protect-pattern", default=None, help="regular expression; matches stay raw")
    g.add_argument("--protect-last", type=int, default=0, help="the last N prompt tokens stay raw")
    g.add_argument(
        "--protect-surprising",
        type=float,
        default=0.0,
        help="share of each prompt's tokens, the most surprising to the base model, kept raw",
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--task",
        default=None,
        help="tree (default), amazon_reviews, commitpackft, jsonl or csv "
        "(default with --train-file/--eval-file: from the file name)",
    )
    g.add_argument("--stage", default="small", help="tree stage")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n-eval", type=int, default=128, help="held-out examples")
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="shorten longer prompts to their head and tail (the count is reported)",
    )
    g = p.add_argument_group("task options (each only for the tasks that take it)")
    g.add_argument(
        "--data-dir",
        default=None,
        help="local *train* / *test* files (amazon_reviews, commitpackft); "
        "default: the Hugging Face hub",
    )
    g.add_argument("--category", default=None, help="amazon_reviews: hub review category")
    g.add_argument("--language", default=None, help="commitpackft: language")
    g.add_argument(
        "--max-file-chars",
        type=int,
        default=None,
        help="commitpackft: leave out commits whose old or new file is longer",
    )
    g.add_argument("--train-file", default=None, help="jsonl/csv: training rows")
    g.add_argument("--eval-file", default=None, help="jsonl/csv: held-out rows")
    g.add_argument("--prompt-field", default=None, help='jsonl/csv (default "prompt")')
    g.add_argument("--answer-field", default=None, help='jsonl/csv (default "answer")')
    g.add_argument(
        "--prompt-template",
        default=None,
        help='jsonl/csv: e.g. "Review: {text}, Label:" (row fields in braces)',
    )
    g.add_argument(
        "--answer-choices",
        default=None,
        help="jsonl/csv: comma-separated labels (adds choice accuracy, macro-F1)",
    )
    g.add_argument("--metrics", default=None, help="jsonl/csv: comma-separated metric names")
    g.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip and count malformed rows instead of stopping at the first",
    )


TASK_OPTIONS = (
    "data_dir", "category", "language", "max_file_chars", "train_file", "eval_file",
    "prompt_field", "answer_field", "prompt_template", "answer_choices", "metrics",
)  # fmt: skip


def _task_name_and_options(args: argparse.Namespace) -> tuple[str, dict]:
    """The task named by --task (or implied by --train-file/--eval-file) and the task options
    the user set; a task that does not take one of them says so (see get_task)."""
    from kmerge.tasks.records import file_format

    options = {k: getattr(args, k) for k in TASK_OPTIONS if getattr(args, k) is not None}
    for key in ("answer_choices", "metrics"):
        if key in options:
            options[key] = [v.strip() for v in options[key].split(",") if v.strip()]
    if args.skip_bad_rows:
        options["skip_bad_rows"] = True
    task = args.task
    if task is None:
        user_file = options.get("train_file") or options.get("eval_file")
        task = file_format(user_file) if user_file else "tree"
    return task, options


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--curriculum", default=None, help="comma-separated tree stages, e.g. small,xsmall"
    )
    g.add_argument("--gate", type=float, default=0.85)
    g.add_argument("--final-gate", type=float, default=0.95)
    g.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training examples (default: the tree task makes a fresh one for every example "
        "the run uses; file tasks use every row)",
    )
    g.add_argument(
        "--balance-classes",
        action="store_true",
        help="labelled tasks: train on every answer equally often (minority classes repeated)",
    )
    g.add_argument("--steps", type=int, default=300, help="optimizer steps (per curriculum stage)")
    g.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after this many seconds of optimisation (evaluation excluded); the LR "
        "schedule follows the budget",
    )
    g.add_argument(
        "--budget-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU seconds (fair when runs share the machine)",
    )
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    g.add_argument(
        "--k-choices",
        default=None,
        help="comma-separated K values, one drawn per step (each <= --k): one model for all",
    )
    g.add_argument(
        "--k-order",
        choices=("sample", "schedule"),
        default="sample",
        help="schedule: walk --k-choices in order, an equal share of the run each",
    )
    g.add_argument(
        "--init-from", default=None, help="warm start: LoRA (and encoder) of this checkpoint"
    )
    g = p.add_argument_group("distillation from an uncompressed teacher (kmerge.distillation)")
    g.add_argument("--teacher", default=None, help='a K=1 checkpoint, or "base" (adapters off)')
    g.add_argument("--distill-kl-weight", type=float, default=2.0)
    g.add_argument("--distill-temperature", type=float, default=1.0)
    g.add_argument("--distill-hidden-weight", type=float, default=0.0)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--encoder-lr", type=float, default=None)
    g.add_argument("--warmup-steps", type=int, default=20)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--log-every", type=int, default=10, help="steps per loss record")
    g = p.add_argument_group("scale-out and faults (docs/distributed.md)")
    g.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="data-parallel processes, started by accelerate's launcher (GPUs, else CPU); "
        "--batch-size is per process",
    )
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None)
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="less activation memory, slower"
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=100,
        help="steps between resumable checkpoints in OUTPUT_DIR/checkpoints; SIGINT/SIGTERM "
        "then write one and stop cleanly (0: no checkpoints, signals act as usual)",
    )
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many to keep")
    g.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what OUTPUT_DIR holds (a finished run, another run's files); without it "
        "a non-empty OUTPUT_DIR is refused unless --resume continues an interrupted run",
    )


def _protect_pattern(args: argparse.Namespace, task: str | None) -> str | None:
    """--protect-pattern, or with --protect-query the task's question pattern."""
    if not getattr(args, "protect_query", False):
        return args.protect_pattern
    if args.protect_pattern:
        raise KMergeConfigError("give --protect-query or --protect-pattern, not both")
    from kmerge.tasks.base import TASKS

    pattern = TASKS.lookup(task or "tree").query_pattern
    if pattern is None:
        raise KMergeConfigError(
            f"task {task!r} marks no question for --protect-query; use --protect-pattern REGEX"
        )
    return pattern


def _model_config(args: argparse.Namespace, task: str | None = None):
    from kmerge.modeling import KMergeConfig

    return KMergeConfig(
        k=4 if args.k is None else args.k,
        base_model=args.base_model,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        encoder_layers=args.encoder_layers,
        encoder_hidden_size=args.encoder_hidden_size,
        block_alignment=args.block_alignment,
        encoder_input_norm=args.encoder_input_norm,
        prepend_bos=args.prepend_bos,
        merge_norm=args.merge_norm,
        protect_pattern=_protect_pattern(args, task),
        protect_last=args.protect_last,
        protect_surprising=args.protect_surprising,
    )


def _train_config(args: argparse.Namespace, **extra):
    from kmerge.training import TrainConfig

    task, options = _task_name_and_options(args)
    return TrainConfig(
        model=_model_config(args, task),
        task=task,
        task_options=options,
        max_prompt_tokens=args.max_prompt_tokens,
        stage=args.stage,
        curriculum=args.curriculum.split(",") if args.curriculum else None,
        gate=args.gate,
        final_gate=args.final_gate,
        n_train=args.n_train,
        n_eval=args.n_eval,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        encoder_lr=args.encoder_lr,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every,
        log_every=args.log_every,
        seed=args.seed,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        overwrite=args.overwrite,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        time_budget=args.time_budget,
        budget_clock=args.budget_clock,
        lr_schedule=args.lr_schedule,
        k_choices=_numbers(args.k_choices, int, "--k-choices") if args.k_choices else None,
        k_order=args.k_order,
        init_from=args.init_from,
        balance_classes=args.balance_classes,
        teacher=args.teacher,
        distill_kl_weight=args.distill_kl_weight,
        distill_temperature=args.distill_temperature,
        distill_hidden_weight=args.distill_hidden_weight,
        **extra,
    )


def cmd_train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from kmerge.training import NonFiniteLossError, TrainingInterrupted, train

    cfg = _train_config(args, output_dir=args.output_dir)
    if _launched_processes(args.num_processes, args.argv):
        return
    # Every process ends the same way; the main one reports for all of them.
    try:
        result = train(cfg)
    except TrainingInterrupted as stop:  # a clean stop, not an error: the checkpoint resumes it
        if PartialState().is_main_process:
            print(f"kmerge: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except NonFiniteLossError as err:
        if PartialState().is_main_process:
            print(f"kmerge: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if not PartialState().is_main_process:
        return
    final = {k: v for k, v in (result.final_eval or {}).items() if k != "predictions"}
    summary = {
        "task": cfg.task,
        "k": cfg.model.k,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 1),
        "final_eval": final or None,
        "checkpoint": str(Path(args.output_dir) / "checkpoint"),
        "command": _command(args),
    }
    _write_json(Path(args.output_dir) / "results.json", summary)
    print(json.dumps(summary))


def _launched_processes(n: int | None, argv: list[str]) -> bool:
    """With ``--num-processes N`` (N > 1) outside a launch, run this same command as N
    data-parallel processes through accelerate's launcher (torch elastic, what ``accelerate
    launch --multi_gpu`` does) and return True once they have finished."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if n is None or (n == 1 and launched == 1):
        return False
    if n < 1:
        raise KMergeConfigError(f"--num-processes must be >= 1, got {n}")
    if launched > 1:  # this is one of the launched processes
        if n != launched:
            raise KMergeConfigError(f"--num-processes {n}, but {launched} processes were launched")
        return False
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launch = launch_command_parser().parse_args(
        ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no"]  # kmerge's options decide
        + ["--main_process_port", str(_free_port()), "-m", "kmerge", *argv]
    )
    try:
        launch_command(launch)
    except ChildFailedError as err:  # each process has printed its own message
        codes = [failure.exitcode for failure in err.failures.values()]
        raise SystemExit(next((c for c in codes if c > 0), 1)) from None
    except SignalException as err:  # the processes got the signal too, and checkpointed
        raise SystemExit(128 + err.sigval) from None
    return True


def _free_port() -> int:
    """A free local TCP port for the processes' rendezvous (not the fixed default, which
    another run on the machine may hold)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(args: argparse.Namespace) -> str:
    """The command line as given to ``main`` (for the records that results carry)."""
    return shlex.join(["kmerge", *args.argv])


def _write_json(path: Path, payload: dict) -> None:
    from kmerge.io import atomic_write_text

    if path.is_dir():
        raise KMergeConfigError(f"{path} is a directory, not a file to write")
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _check_counts(args: argparse.Namespace, minimum: dict[str, int]) -> None:
    """Refuse a count option below its minimum (an option left unset, None, is fine)."""
    for name, least in minimum.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            option = "--" + name.replace("_", "-")
            raise KMergeConfigError(f"{option} must be >= {least}, got {value}")


def _load(args: argparse.Namespace):
    from kmerge.modeling import KMergeModel

    if args.checkpoint:
        model = KMergeModel.from_pretrained(args.checkpoint)
        if args.k is not None:
            model.resolve_k(args.k)  # fails now, naming both K, not after loading the data
    else:
        task = _task_name_and_options(args)[0] if hasattr(args, "task") else None
        model = KMergeModel.from_base(args.base_model, _model_config(args, task))
    return model.merge_lora()  # inference only: one matmul per adapted layer instead of three


def cmd_eval(args: argparse.Namespace) -> None:
    from kmerge.evaluation import evaluate
    from kmerge.tasks.base import fit_prompts
    from kmerge.training import build_task

    _check_counts(args, {"batch_size": 1, "n_eval": 1, "max_new_tokens": 1, "generate_n": 0})
    if args.output and Path(args.output).is_dir():
        raise KMergeConfigError(f"--output {args.output} is a directory, not a file to write")
    name, options = _task_name_and_options(args)
    task = build_task(name, args.seed, args.stage, args.n_eval, options=options)
    examples = task.examples("test", args.n_eval)  # bad data fails before the model loads
    model = _load(args)
    examples, prompts_cut = fit_prompts(examples, model.tokenizer, args.max_prompt_tokens)
    result = evaluate(
        model,
        examples,
        task,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        generate_n=args.generate_n,
        reference_perplexity=args.reference_perplexity,
        k=args.k if args.checkpoint else None,
    )
    predictions = result.pop("predictions")
    choices = result.pop("choices", None)
    result = {
        "task": f"{name}:{args.stage}" if name == "tree" else name,
        **result,
        "prompts_cut": prompts_cut,
        "bad_rows_skipped": task.skipped_rows,
        "rows_filtered": getattr(task, "filtered_rows", 0),
        "task_options": options,
        "command": _command(args),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        extra = {"predictions": predictions} | ({"choices": choices} if choices else {})
        _write_json(Path(args.output), result | extra)


def cmd_generate(args: argparse.Namespace) -> None:
    _check_counts(args, {"max_new_tokens": 1})
    model = _load(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    kwargs = {}
    if args.do_sample:
        kwargs = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    k = args.k if args.checkpoint else None
    for text in model.generate(prompts, max_new_tokens=args.max_new_tokens, k=k, **kwargs):
        print(text)


def cmd_demo(args: argparse.Namespace) -> None:
    from kmerge.demo import run_demo

    overrides = {k: v for k, v in vars(args).items() if k in ("steps", "batch_size", "stage")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.block_alignment:
        overrides["model"] = {"block_alignment": args.block_alignment}
    ks = tuple(int(k) for k in args.ks.split(","))
    run_demo(args.output_dir, ks=ks, **overrides)


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KMergeConfigError(f"{option} takes comma-separated numbers, got {text!r}") from None


def cmd_pareto(args: argparse.Namespace) -> None:
    from kmerge.modeling import KMergeConfig
    from kmerge.pareto import SweepConfig, run_sweep
    from kmerge.training import TrainConfig

    task, options = _task_name_and_options(args)
    template = TrainConfig(
        model=KMergeConfig(base_model=args.base_model),
        task=task,
        task_options=options,
        max_prompt_tokens=args.max_prompt_tokens,
        stage=args.stage,
        n_train=args.n_train,
        n_eval=args.n_eval,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        eval_every=args.steps,  # held-out evaluation only at the end: the sweep's number
    )
    sweep = SweepConfig(
        train=template,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        ratios=_numbers(args.ratios, float, "--ratios"),
        seeds=_numbers(args.seeds, int, "--seeds") if args.seeds else [args.seed],
        tune=args.tune,
        metric=args.metric,
        output_dir=args.output_dir,
        command=_command(args),
    )
    run_sweep(sweep)


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from kmerge.bench import BenchConfig, format_tables, run_bench

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        base_model=args.base_model,
        lengths=_numbers(args.lengths, int, "--lengths"),
        ks=_numbers(args.ks, int, "--ks"),
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=args.decode_tokens,
        device=args.device,
        dtype=args.dtype,
        merge_lora=args.merge_lora,
        train=not args.skip_train,
        train_ks=_numbers(args.train_ks, int, "--train-ks"),
        train_batch_size=args.train_batch_size,
        train_data_dir=args.train_data_dir,
        train_prompt_tokens=args.train_prompt_tokens,
        train_max_prompt_tokens=args.train_max_prompt_tokens,
        generate=not args.skip_generate,
        generate_k=args.generate_k,
        generate_prompt_tokens=args.generate_prompt_tokens,
        generate_new_tokens=args.generate_new_tokens,
        generate_repeats=args.generate_repeats,
        seed=args.seed,
        output_dir=args.output_dir,
        command=_command(args),
    )
    result = run_bench(cfg)
    print(format_tables(result))
    print(
        f"\nwrote {Path(args.output_dir) / 'bench.json'} and {Path(args.output_dir) / 'bench.png'}"
    )


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prefill, decode, memory, KV cache")
    g.add_argument("--base-model", default=DEFAULT_MODEL, help="embedded name, hub id or local dir")
    g.add_argument("--lengths", default="256,1024,2048,4096", help="prompt lengths in tokens")
    g.add_argument("--ks", default="1,2,4,8", help="comma-separated K values (1 = uncompressed)")
    g.add_argument("--repeats", type=int, default=5, help="timed rounds (medians, IQR reported)")
    g.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    g.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps (0: skip)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    g.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, else float32), ...")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument(
        "--merge-lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold LoRA into the base weights for prefill and generation, as kmerge eval and "
        "generate do (training steps always run it unmerged)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", default="runs/bench", help="bench.json and bench.png")
    g = p.add_argument_group("training step")
    g.add_argument("--skip-train", action="store_true")
    g.add_argument("--train-ks", default="1,4")
    g.add_argument("--train-batch-size", type=int, default=16)
    g.add_argument(
        "--train-data-dir",
        default=None,
        help="Amazon Reviews files (e.g. ../shared/data/amazon_reviews); default: synthetic",
    )
    g.add_argument("--train-prompt-tokens", type=int, default=256, help="synthetic prompts")
    g.add_argument("--train-max-prompt-tokens", type=int, default=None, help="cut longer reviews")
    g = p.add_argument_group("generation: cached generate vs re-running the sequence per token")
    g.add_argument("--skip-generate", action="store_true")
    g.add_argument("--generate-k", type=int, default=4)
    g.add_argument("--generate-prompt-tokens", type=int, default=1024)
    g.add_argument("--generate-new-tokens", type=int, default=64)
    g.add_argument("--generate-repeats", type=int, default=3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmerge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the encoder and LoRA on a task")
    _add_model_args(p)
    _add_data_args(p)
    _add_train_args(p)
    p.add_argument("--output-dir", default="runs/train")
    p.set_defaults(func=cmd_train)

    for name, func, help_text in (
        ("eval", cmd_eval, "the task's metrics and the measured compression"),
        ("generate", cmd_generate, "generate answers for prompts"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", default=None, help="directory written by train")
        _add_model_args(p)
        p.add_argument("--batch-size", type=int, default=32)
        if name == "eval":
            _add_data_args(p)
            p.add_argument("--output", default=None, help="write results + predictions as JSON")
            p.add_argument(
                "--generate-n",
                type=int,
                default=None,
                help="generate for the first N examples only (default: the task's)",
            )
            p.add_argument(
                "--max-new-tokens",
                type=int,
                default=None,
                help="default: the longest reference answer + 1",
            )
            p.add_argument(
                "--reference-perplexity",
                type=float,
                default=None,
                help="the uncompressed model's perplexity, for P-LF1 on perplexity",
            )
        else:
            p.add_argument(
                "--prompt", action="append", help="prompt (repeatable; default: stdin lines)"
            )
            p.add_argument("--max-new-tokens", type=int, default=32)
            p.add_argument("--do-sample", action="store_true")
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--top-p", type=float, default=1.0)
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="K=4 vs uncompressed K=1 on the embedded model (CPU)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--ks", default="1,4", help="comma-separated K values to compare")
    p.add_argument("--steps", type=int, default=None, help="override the demo's step budget")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--stage", default=None)
    p.add_argument("--block-alignment", choices=("start", "end", "segments"), default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "pareto", help="kmerge and the baselines: quality vs measured compression, resumable"
    )
    _add_data_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--methods",
        default="full,kmerge",
        help="comma-separated method names (kmerge, full, mean_pool, truncate_last, random_drop, "
        "stride_drop, self_information, meta_tokens, llmlingua2, ...)",
    )
    g.add_argument("--ratios", default="2,4,8", help="comma-separated target compression ratios")
    g.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    g.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LoRA-tune the token-level baselines on their compressed prompts (recorded)",
    )
    g.add_argument("--metric", default=None, help="y axis (default: the task's primary metric)")
    g.add_argument("--base-model", default=DEFAULT_MODEL, help="embedded name, hub id or local dir")
    g.add_argument("--n-train", type=int, default=2048)
    g.add_argument("--steps", type=int, default=300, help="optimizer steps for every point")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--warmup-steps", type=int, default=20, help="keep it below --steps")
    g.add_argument("--output-dir", default="runs/pareto", help="points, runs, results, plot")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("bench", help="prefill, decode, memory, training and generation speed")
    _add_bench_args(p)
    p.set_defaults(func=cmd_bench)

    # serve and export keep their flags in their own modules (imported only when run).
    from kmerge import export
    from kmerge.serving import cli as serving_cli

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs kmerge[serve])")
    serving_cli.add_arguments(p)
    p.set_defaults(func=serving_cli.run)
    p = sub.add_parser("export", help="plain HF model folder (LoRA folded in) + the encoder")
    export.add_arguments(p)
    p.set_defaults(func=export.run)
    return parser


# A path that names the wrong kind of thing, or one kmerge may not write: the user's to fix.
PATH_ERRORS = (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


def _quiet_model_loading() -> None:
    """Turn off transformers' own progress bars ("Loading weights", a blink for kmerge's
    models), which would come before an error line; the hub's download bars stay."""
    from transformers.utils import logging as transformers_logging

    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)
    if set_hook is not None:
        set_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # to start it again in processes
    _quiet_model_loading()
    try:
        args.func(args)
    except (KMergeError, FileNotFoundError, *PATH_ERRORS) as err:
        print(f"kmerge: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
