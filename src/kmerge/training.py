"""Training: the encoder and LoRA jointly, loss on answer tokens only, on accelerate.

A thin loop in the nanoGPT spirit: AdamW with separate learning rates for LoRA and encoder,
linear warm-up then cosine decay, gradient accumulation and clipping, periodic evaluation,
metrics as JSON Lines, an atomic checkpoint at the end. Curriculum mode walks through tree
stages, moving on when held-out accuracy reaches the gate or the stage's step budget runs out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from kmerge.errors import KMergeConfigError
from kmerge.evaluation import evaluate
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.tasks import Example, Task, get_task
from kmerge.tasks.base import fit_prompts
from kmerge.tasks.files import FileTask
from kmerge.tasks.tree import STAGES


@dataclass
class TrainConfig:
    """One training run. ``model`` configures the KMergeModel built around the base model."""

    model: KMergeConfig = field(default_factory=KMergeConfig)
    task: str = "tree"
    stage: str = "small"  # tree stage (ignored by other tasks)
    curriculum: list[str] | None = None  # tree stages to walk through, in order
    gate: float = 0.85  # held-out accuracy that ends a curriculum stage
    final_gate: float = 0.95  # ... and the last stage
    # Task constructor options, e.g. {"data_dir": ...} or {"train_file": ..., "eval_file": ...}
    task_options: dict = field(default_factory=dict)
    max_prompt_tokens: int | None = None  # longer prompts keep head + tail (fit_prompts)
    n_train: int = 2048
    n_eval: int = 128
    steps: int = 300  # optimizer steps (per stage in curriculum mode)
    batch_size: int = 32  # 16 left K=4 at chance on the tree task here: docs/demo.md
    grad_accum: int = 1
    lr: float = 3e-4  # LoRA learning rate
    encoder_lr: float | None = None  # default: same as lr
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    eval_every: int = 50
    log_every: int = 10
    seed: int = 0
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = KMergeConfig.from_dict(self.model)
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "n_eval"):
            if getattr(self, name) < 1:
                raise KMergeConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise KMergeConfigError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.curriculum and self.task != "tree":
            raise KMergeConfigError("a curriculum walks tree stages: it needs --task tree")
        stages = self.curriculum or ([self.stage] if self.task == "tree" else [])
        for stage in stages:
            if stage not in STAGES:
                raise KMergeConfigError(f"unknown tree stage {stage!r}; known: {', '.join(STAGES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model: KMergeModel
    history: list[dict]  # every logged record, as written to metrics.jsonl
    train_seconds: float
    steps: int
    final_eval: dict | None


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    held_out: list[Example]
    prompts_cut: int  # prompts shortened to max_prompt_tokens (train + held-out)

    def report(self) -> dict:
        """What loading did to the data, for the logs: nothing is cut or skipped silently."""
        return {
            "task": self.task.name,
            "n_train": len(self.train),
            "n_eval": len(self.held_out),
            "prompts_cut": self.prompts_cut,
            "bad_rows_skipped": self.task.skipped_rows,
            "rows_filtered": getattr(self.task, "filtered_rows", 0),
        }


def load_data(cfg: TrainConfig, tokenizer, stage: str | None = None) -> TaskData:
    """Training and held-out examples for a run (or one curriculum stage)."""
    task = build_task(cfg.task, cfg.seed, stage or cfg.stage, cfg.n_eval, cfg.n_train,
                      cfg.task_options)  # fmt: skip
    train = task.examples("train", cfg.n_train)
    if isinstance(task, FileTask) and task.files["test"] is None:
        held_out = []  # user data without an eval file: train only, no evaluation
    else:
        held_out = task.examples("test", cfg.n_eval)
    train, cut_train = fit_prompts(train, tokenizer, cfg.max_prompt_tokens)
    held_out, cut_eval = fit_prompts(held_out, tokenizer, cfg.max_prompt_tokens)
    return TaskData(task, train, held_out, cut_train + cut_eval)


def build_task(
    name: str,
    seed: int,
    stage: str,
    n_eval: int,
    n_train: int | None = None,
    options: dict | None = None,
) -> Task:
    """A task from the settings train and eval share (only the tree task has stages; its
    ``n_train`` defaults to the task's own). ``options`` go to the task's constructor."""
    kwargs: dict = {"seed": seed} | (options or {})
    if name == "tree":
        kwargs |= {"stage": stage, "n_test": n_eval}
        if n_train is not None:
            kwargs["n_train"] = n_train
    return get_task(name, **kwargs)


def make_optimizer(model: KMergeModel, cfg: TrainConfig) -> torch.optim.AdamW:
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in encoder_params}
    lora_params = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": lora_params, "lr": cfg.lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr or cfg.lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig, model: KMergeModel | None = None) -> TrainResult:
    """Train ``model`` (built from ``cfg.model`` when not given) and return it with its history."""
    set_seed(cfg.seed)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    if model is None:
        model = KMergeModel.from_base(cfg.model.base_model, cfg.model)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if out_dir and accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    stages = cfg.curriculum or [cfg.stage]
    optimizer = make_optimizer(model, cfg)
    total_steps = cfg.steps * len(stages)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    history: list[dict] = []
    metrics_file = (
        (out_dir / "metrics.jsonl").open("w") if out_dir and accelerator.is_main_process else None
    )

    def log(record: dict) -> None:
        history.append(record)
        if metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    step, start, eval_seconds = 0, time.perf_counter(), 0.0
    final_eval = None
    bar = tqdm(total=total_steps, desc=f"train K={cfg.model.k}", disable=not cfg.progress)
    for stage_index, stage in enumerate(stages):
        data = load_data(cfg, model.tokenizer, stage if cfg.curriculum else None)
        train_examples, eval_examples = data.train, data.held_out
        log({"step": step, "stage": stage, "data": data.report()})
        gate = cfg.final_gate if stage_index == len(stages) - 1 else cfg.gate
        loader = DataLoader(
            train_examples,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed + stage_index),
            collate_fn=list,
            drop_last=len(train_examples) >= cfg.batch_size,
        )
        loader = accelerator.prepare(loader)
        stage_step, window, batches = 0, [], iter(loader)  # window: losses since the last log
        model.train()
        while stage_step < cfg.steps:
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    batch = next(batches)
                with accelerator.accumulate(model):
                    out = model([e.prompt for e in batch], [e.answer for e in batch])
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                step_loss += out.loss.item() / cfg.grad_accum
            step, stage_step = step + 1, stage_step + 1
            bar.update(1)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss became {step_loss} at step {step}; stopping")
            window.append(step_loss)
            if step % cfg.log_every == 0:
                avg = sum(window) / len(window)
                log(
                    {
                        "step": step,
                        "stage": stage,
                        "loss": avg,
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed": time.perf_counter() - start,
                    }
                )
                bar.set_postfix(loss=f"{avg:.3f}", stage=stage)
                window = []
            if eval_examples and (step % cfg.eval_every == 0 or stage_step == cfg.steps):
                final_eval = evaluate(
                    accelerator.unwrap_model(model), eval_examples, data.task, progress=False
                )
                primary = final_eval["primary_metric"]
                eval_seconds += final_eval["eval_seconds"]
                model.train()
                log(
                    {
                        "step": step,
                        "stage": stage,
                        **{
                            f"eval_{name}": value
                            for name, value in final_eval.items()
                            if isinstance(value, float) and name != "eval_seconds"
                        },
                        "elapsed": time.perf_counter() - start,
                    }
                )
                bar.write(
                    f"step {step} stage {stage}: held-out {primary} {final_eval[primary]:.3f}"
                )
                if cfg.curriculum and final_eval[primary] >= gate:
                    break
    bar.close()
    train_seconds = time.perf_counter() - start - eval_seconds  # optimisation time only
    model = accelerator.unwrap_model(model)
    model.eval()
    if out_dir and accelerator.is_main_process:
        model.save_pretrained(out_dir / "checkpoint")
    if metrics_file:
        metrics_file.close()
    return TrainResult(model, history, train_seconds, step, final_eval)
