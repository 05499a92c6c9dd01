"""The ``kmerge`` command line: train, eval, generate, demo.

Every subcommand is a thin shell over the Python function of the same name; bad input ends
with one line ``kmerge: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kmerge.errors import KMergeError
from kmerge.models import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--base-model", default=DEFAULT_MODEL, help="embedded name, hub id or local dir")
    g.add_argument("-k", "--k", type=int, default=4, help="block size K (1 = uncompressed)")
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


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", default="tree", help="built-in task (default: tree)")
    g.add_argument("--stage", default="small", help="tree stage")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n-eval", type=int, default=128, help="held-out examples")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--curriculum", default=None, help="comma-separated tree stages, e.g. small,xsmall"
    )
    g.add_argument("--gate", type=float, default=0.85)
    g.add_argument("--final-gate", type=float, default=0.95)
    g.add_argument("--train-file", default=None, help='JSON Lines {"prompt", "answer"}')
    g.add_argument("--eval-file", default=None)
    g.add_argument("--n-train", type=int, default=2048)
    g.add_argument("--steps", type=int, default=300, help="optimizer steps (per curriculum stage)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--encoder-lr", type=float, default=None)
    g.add_argument("--warmup-steps", type=int, default=20)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50)


def _model_config(args: argparse.Namespace):
    from kmerge.modeling import KMergeConfig

    return KMergeConfig(
        k=args.k,
        base_model=args.base_model,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        encoder_layers=args.encoder_layers,
        encoder_hidden_size=args.encoder_hidden_size,
        block_alignment=args.block_alignment,
        encoder_input_norm=args.encoder_input_norm,
        prepend_bos=args.prepend_bos,
    )


def _train_config(args: argparse.Namespace, **extra):
    from kmerge.training import TrainConfig

    return TrainConfig(
        model=_model_config(args),
        task=args.task,
        stage=args.stage,
        curriculum=args.curriculum.split(",") if args.curriculum else None,
        gate=args.gate,
        final_gate=args.final_gate,
        train_file=args.train_file,
        eval_file=args.eval_file,
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
        seed=args.seed,
        **extra,
    )


def cmd_train(args: argparse.Namespace) -> None:
    from kmerge.training import train

    result = train(_train_config(args, output_dir=args.output_dir))
    print(
        json.dumps(
            {
                "steps": result.steps,
                "train_seconds": round(result.train_seconds, 1),
                "final_accuracy": (result.final_eval or {}).get("accuracy"),
                "checkpoint": str(Path(args.output_dir) / "checkpoint"),
            }
        )
    )


def _load(args: argparse.Namespace):
    from kmerge.modeling import KMergeModel

    if args.checkpoint:
        return KMergeModel.from_pretrained(args.checkpoint)
    return KMergeModel.from_base(args.base_model, _model_config(args))


def cmd_eval(args: argparse.Namespace) -> None:
    from kmerge.evaluation import evaluate
    from kmerge.tasks import load_jsonl_examples
    from kmerge.training import build_task

    model = _load(args)
    if args.data:
        examples = load_jsonl_examples(args.data)[: args.n_eval]
        source = args.data
    else:
        task = build_task(args.task, args.seed, args.stage, args.n_eval)
        examples = task.examples("test", args.n_eval)
        source = f"{args.task}:{args.stage}" if args.task == "tree" else args.task
    result = evaluate(model, examples, batch_size=args.batch_size)
    predictions = result.pop("predictions")
    result |= {"data": source, "k": model.k, "command": " ".join(sys.argv)}
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result | {"predictions": predictions}, indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    model = _load(args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    kwargs = {}
    if args.do_sample:
        kwargs = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    for text in model.generate(prompts, max_new_tokens=args.max_new_tokens, **kwargs):
        print(text)


def cmd_demo(args: argparse.Namespace) -> None:
    from kmerge.demo import run_demo

    overrides = {k: v for k, v in vars(args).items() if k in ("steps", "batch_size", "stage")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.block_alignment:
        overrides["model"] = {"block_alignment": args.block_alignment}
    ks = tuple(int(k) for k in args.ks.split(","))
    run_demo(args.output_dir, ks=ks, **overrides)


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
        ("eval", cmd_eval, "exact-match accuracy and measured compression"),
        ("generate", cmd_generate, "generate answers for prompts"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", default=None, help="directory written by train")
        _add_model_args(p)
        p.add_argument("--batch-size", type=int, default=32)
        if name == "eval":
            _add_data_args(p)
            p.add_argument("--data", default=None, help='JSON Lines {"prompt", "answer"} rows')
            p.add_argument("--output", default=None, help="write results + predictions as JSON")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (KMergeError, FileNotFoundError) as err:
        print(f"kmerge: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
