"""Training: the encoder and LoRA jointly, loss on answer tokens only, on accelerate.

A thin loop in the nanoGPT spirit: AdamW with separate learning rates for LoRA and encoder,
linear warm-up then cosine decay, gradient accumulation and clipping, periodic evaluation,
metrics as JSON Lines, an atomic checkpoint at the end. Curriculum mode walks through tree
stages, moving on when held-out accuracy reaches the gate or the stage's step budget runs out.

The same loop runs as each process of a data-parallel accelerate launch, and survives faults:
resumable checkpoints (kmerge.checkpointing), a clean stop on SIGINT/SIGTERM, a NaN/inf loss
stopping the run before it touches the weights. See docs/distributed.md.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kmerge.checkpointing import (
    Checkpointer,
    checkpoint_to_resume,
    read_history,
    save_model,
    store_model_as_adapter,
)
from kmerge.distributed import average_gradients, make_accelerator
from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.evaluation import class_prior, evaluate_sharded
from kmerge.io import atomic_write_text, write_json
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.options import check_values, from_known_keys, option
from kmerge.provenance import as_json, differences
from kmerge.reconstruction import Objective, is_reconstruction_step, reconstruction_example
from kmerge.tasks import Example, Task, build_task, check_stages, task_stages
from kmerge.tasks.base import example_protect_spans, fit_prompts, name_example

# Engines that own the gradients (sharded, or reduced inside their backward): the distiller's
# gradients cannot be averaged by hand there (kmerge.distributed.average_gradients).
_OWN_GRADIENTS = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)

# The best measured K>1 recipe (docs/quality.md, "Twenty CPU-minutes in bf16"): each merged
# position matched to the base model's state at its block's last token (the teacher's default
# weights), a match-only first fifth, faster encoder and LoRA learning rates, segment-aligned
# blocks. `kmerge train --recipe merged` and the demo's K=4 run; a teacher adds nothing at K=1.
MERGED_RECIPE = {"teacher": "base", "encoder_lr": 3e-3, "distill_match_warmup": 0.2, "lr": 6e-4}
MERGED_RECIPE_MODEL = {"block_alignment": "segments"}

# The progress bar of a time-budgeted run: seconds of the budget spent.
_TIME_BAR = (
    "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
)


@dataclass
class TrainConfig:
    """One training run. ``model`` configures the KMergeModel built around the base model."""

    model: KMergeConfig = option(cli=False, default_factory=KMergeConfig)
    task: str = option(
        "tree",
        "tree, amazon_reviews, commitpackft, jsonl or csv (the CLI's default with "
        "--train-file/--eval-file: from the file name)",
    )
    stage: str = option("small", "tree stage (other tasks have none)")
    curriculum: list[str] | None = option(
        None, "tree stages walked in order, each until its gate, e.g. small,xsmall"
    )
    gate: float = option(
        0.85, "held-out accuracy that ends a curriculum stage", requires="curriculum"
    )
    final_gate: float = option(0.95, "... and the last stage", requires="curriculum")
    # Task constructor options, e.g. {"data_dir": ...} (the CLI's flags: kmerge.tasks.TaskOptions)
    task_options: dict = option(cli=False, default_factory=dict)
    max_prompt_tokens: int | None = option(
        None, "shorten longer prompts to their head and tail (the count is reported)", minimum=1
    )
    n_train: int | None = option(
        None,
        "training examples (default: the tree task makes a fresh one for every example the "
        "run uses, no repeated epochs; file tasks use every row)",
        minimum=1,
    )
    balance_classes: bool = option(
        False,
        "labelled tasks: train on every answer equally often (minority classes repeated)",
    )
    choice_prior: Literal["uniform", "train"] = option(
        "uniform",
        "labelled tasks, when evaluating: uniform picks the likeliest answer; train weighs each "
        "answer by its frequency in the training data (counted before --balance-classes): for "
        "a model trained with --balance-classes, it undoes the equal priors a balanced stream "
        "teaches (logit adjustment)",
    )
    group_by: str | None = option(
        None,
        "keep the training examples that share this meta field in one batch where they fit "
        '(tree: "tree", all questions on one tree side by side)',
    )
    n_eval: int = option(128, "held-out examples", minimum=1)
    steps: int = option(300, "optimizer steps (per stage in curriculum mode)", minimum=1)
    # 16 left K=4 at chance on the tree task here: docs/demo.md
    batch_size: int = option(32, "examples per optimizer step (per process)", minimum=1)
    grad_accum: int = option(1, "gradient accumulation steps", minimum=1)
    lr: float = option(3e-4, "LoRA learning rate", positive=True)
    encoder_lr: float | None = option(None, "encoder learning rate (default: --lr)", positive=True)
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(20, "linear warm-up steps")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    eval_every: int = option(
        50,
        "steps between held-out evaluations (none inside a warm-up that trains no answers)",
        minimum=1,
    )
    log_every: int = option(10, "steps per loss record")
    # The learning-rate schedule follows the budget: cosine over whichever of steps and time is
    # used up first.
    time_budget: float | None = option(
        None,
        "stop after this many seconds of optimisation (evaluation excluded); the LR schedule "
        "follows the budget",
        positive=True,
    )
    budget_clock: Literal["wall", "cpu"] = option(
        "wall",
        "cpu: this process's CPU seconds (fair when runs share the machine)",
        requires="time_budget",
    )
    lr_schedule: Literal["cosine", "constant"] = option("cosine", "after the linear warm-up")
    focal_gamma: float = option(
        0.0,
        "focal loss on the answer tokens: each token's cross-entropy weighted by (1 - p)^gamma, "
        "so examples the model already gets right weigh less (0: plain cross-entropy)",
        minimum=0.0,
    )
    # The checkpoint then serves each K (evaluate(..., k=), kmerge eval --k).
    k_choices: list[int] | None = option(
        None, "several K in one model: one drawn per step from these (each <= --k)"
    )
    k_order: Literal["sample", "schedule"] = option(
        "sample",
        "schedule: walk --k-choices in order, an equal share of the run each",
        requires="k_choices",
    )
    init_from: str | None = option(
        None, "warm start: the LoRA (and, when shapes match, the encoder) of this checkpoint"
    )
    # Distillation (kmerge.distillation): the teacher reads the plain prompt; the student
    # matches its states inside the prompt and, with those weights, its answer-token
    # distribution and hidden states. The defaults are the measured best (quality.md: prompt
    # distillation from the base model, first 8 layers, weight 3; the answer-token KL did not pay).
    teacher: str | None = option(
        None,
        'distill from an uncompressed teacher: a K=1 checkpoint, or "base" (adapters off); with '
        "the default weights, prompt distillation (best measured K=4 recipe: --teacher base "
        "--encoder-lr 3e-3, docs/quality.md)",
    )
    distill_kl_weight: float = option(
        0.0, "weight of the answer-token KL to the teacher", requires="teacher"
    )
    distill_temperature: float = option(1.0, "temperature of that KL", requires="teacher")
    distill_hidden_weight: float = option(
        0.0, "weight of the per-layer hidden-state distance to the teacher", requires="teacher"
    )
    distill_prompt_weight: float = option(
        3.0,
        "weight of the hidden-state distance inside the prompt: each merged position against the "
        "teacher's state at its block's last token (over --distill-prompt-layers)",
        requires="teacher",
    )
    distill_prompt_layers: int = option(
        8,
        "match only the first N decoder layers inside the prompt (0: all); the teacher then "
        "runs only those layers",
        minimum=0,
        requires="distill_prompt_weight",
    )
    distill_match_warmup: float = option(
        0.0,
        "the first share of the run (of its steps or time budget) trains only the prompt match, "
        "the student running only the matched layers (a cheaper step): merged positions move "
        "towards the plain prompt's states before the task is learnt",
        minimum=0.0,
        maximum=1.0,
        requires="teacher",
    )
    distill_until: float = option(
        1.0,
        "the teacher is dropped after this share of the run (of its steps or time budget): the "
        "rest trains the task alone, a cheaper step (1: distil to the end)",
        positive=True,
        maximum=1.0,
        requires="teacher",
    )
    distill_cache: bool = option(
        False,
        "keep the teacher's outputs per training example (float16, CPU memory): for a training "
        "set seen more than once (--n-train), each teacher forward is paid once",
        requires="teacher",
    )
    # kmerge.reconstruction: a dense signal about what merged vectors hold (ICAE's objective).
    reconstruct_share: float = option(
        0.0,
        "share of optimizer steps that train the model to repeat the merged prompt as tokens "
        "(autoencoding) instead of answering it",
        minimum=0.0,
        maximum=1.0,
    )
    reconstruct_warmup: float = option(
        0.0,
        "the first share of the run (of its steps or time budget) trains only reconstruction: "
        "the model learns to read merged prompts before it learns the task",
        minimum=0.0,
        maximum=1.0,
    )
    reconstruct_objective: Objective = option(
        "repeat",
        "what reconstruction steps train: repeat: the merged prompt back as tokens "
        "(autoencoding); continue: the prompt's first half merged, its second half as the "
        "answer (text continuation)",
    )
    seed: int = option(0, "seed of data, initialisation and sampling")
    output_dir: str | None = option(None, "checkpoint, metrics, results")
    progress: bool = option(True, "progress bar")
    # Fault tolerance: one checkpoint on SIGINT/SIGTERM too, which then stop the run cleanly.
    save_every: int = option(
        100,
        "with an output dir: steps between resumable checkpoints in OUTPUT_DIR/checkpoints; "
        "SIGINT/SIGTERM then write one and stop cleanly (0: no checkpoints, signals act as "
        "usual)",
        minimum=0,
    )
    keep_checkpoints: int = option(
        2, "how many resumable checkpoints to keep", requires="save_every", minimum=1
    )
    resume: bool = option(False, "continue from the newest complete checkpoint")
    overwrite: bool = option(
        False,
        "replace what the output dir holds (a finished run, another run's files); without it "
        "a non-empty output dir is refused unless --resume continues an interrupted run",
    )
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = option(
        None,
        "autocast precision; bf16 pays on GPUs and on CPUs with native bf16, AVX512-BF16 or "
        "AMX (benchmarks/bf16_cpu.py); auto: bf16 where native, else no (default: what the "
        "accelerate launch/config says, else no)",
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory")

    @property
    def checkpoint_every(self) -> int:
        """save_every, where there is an output dir to hold the checkpoints (else 0)."""
        return self.save_every if self.output_dir else 0

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = KMergeConfig.from_dict(self.model)
        check_values(self)
        if self.k_choices is not None:
            if not self.k_choices:
                raise KMergeConfigError("k_choices must list at least one K")
            for k in self.k_choices:
                if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.model.k:
                    raise KMergeConfigError(
                        f"k_choices: every K must be an integer in 1..{self.model.k} (the "
                        f"model's K), got {k!r}"
                    )
        if self.distill_match_warmup == 1.0:
            raise KMergeConfigError("distill_match_warmup must be below 1: 1 leaves no task steps")
        if self.distill_match_warmup and not (
            self.teacher and self.distill_prompt_weight and self.distill_prompt_layers
        ):
            raise KMergeConfigError(
                "distill_match_warmup trains the prompt match over the first N layers: it needs "
                "a teacher, distill_prompt_weight > 0 and distill_prompt_layers > 0"
            )
        if self.distill_until <= self.distill_match_warmup:
            raise KMergeConfigError(
                f"distill_until ({self.distill_until}) must be above distill_match_warmup "
                f"({self.distill_match_warmup}): the teacher would go before the task is trained"
            )
        if self.reconstruct_objective != "repeat" and not (
            self.reconstruct_share or self.reconstruct_warmup
        ):
            raise KMergeConfigError(
                f"reconstruct_objective={self.reconstruct_objective!r} needs reconstruction "
                "steps: set reconstruct_share or reconstruct_warmup"
            )
        for name in ("reconstruct_share", "reconstruct_warmup"):
            if getattr(self, name) == 1.0:
                raise KMergeConfigError(f"{name} must be below 1: 1 leaves no task steps")
            if getattr(self, name) and self.model.k == 1:
                raise KMergeConfigError(
                    f"{name} needs K > 1: at K=1 the prompt is not merged, there is nothing to "
                    "reconstruct"
                )
        weights = (self.distill_kl_weight, self.distill_hidden_weight, self.distill_prompt_weight)
        if self.teacher and not any(weights):
            raise KMergeConfigError(
                "a teacher with every distillation weight at 0 distils nothing: set "
                "distill_prompt_weight, distill_kl_weight or distill_hidden_weight above 0"
            )
        if self.resume and self.overwrite:
            raise KMergeConfigError("give resume or overwrite, not both")
        if self.resume and not self.output_dir:
            raise KMergeConfigError("resume needs the output_dir that holds the checkpoints")
        if self.curriculum and not task_stages(self.task):
            raise KMergeConfigError(
                f"a curriculum walks a task's stages: task {self.task!r} has none"
            )
        check_stages(self.task, self.curriculum or ([self.stage] if task_stages(self.task) else []))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return from_known_keys(cls, data, "train config")

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TrainConfig:
        """The settings a run recorded in ``run_dir/train_config.json``."""
        path = Path(run_dir) / "train_config.json"
        if not path.is_file():
            raise KMergeConfigError(f"{run_dir} is not a training run: it has no {path.name}")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise KMergeConfigError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise KMergeConfigError(f"{path} does not hold a config object")
        return cls.from_dict(data)


@dataclass
class TrainResult:
    model: KMergeModel
    history: list[dict]  # every logged record, as written to metrics.jsonl
    train_seconds: float
    steps: int
    final_eval: dict | None
    teacher_seconds: float = 0.0  # of train_seconds, the distillation teacher's forwards (wall)


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    held_out: list[Example]
    prompts_cut: int  # prompts shortened to max_prompt_tokens (train + held-out)
    choice_prior: dict[str, float] | None = None  # evaluate(choice_prior=), see TrainConfig

    def report(self) -> dict:
        """What loading did to the data, for the logs: nothing is cut or skipped silently."""
        return {
            "task": self.task.name,
            "n_train": len(self.train),
            "n_eval": len(self.held_out),
            "prompts_cut": self.prompts_cut,
            "bad_rows_skipped": self.task.skipped_rows,
            "rows_filtered": self.task.filtered_rows,
        }


def load_data(
    cfg: TrainConfig, tokenizer, stage: str | None = None, processes: int = 1
) -> TaskData:
    """Training and held-out examples for a run (or one curriculum stage)."""
    n_train = cfg.n_train
    if n_train is None:  # fresh examples, as many as the stage can consume, if the task can
        n_train = cfg.steps * cfg.batch_size * cfg.grad_accum * processes
    task = build_task(cfg.task, cfg.seed, stage or cfg.stage, cfg.n_eval, n_train,
                      cfg.task_options)  # fmt: skip
    if cfg.n_train is None and not task.generates_examples:
        n_train = None  # every row of the task's training data
    train = task.examples("train", n_train)
    held_out = task.examples("test", cfg.n_eval) if task.has_split("test") else []
    prior = choice_prior(cfg, task, train)
    if cfg.balance_classes:
        train = balanced(train, cfg.seed)
    train, cut_train = fit_prompts(train, tokenizer, cfg.max_prompt_tokens)
    held_out, cut_eval = fit_prompts(held_out, tokenizer, cfg.max_prompt_tokens)
    return TaskData(task, train, held_out, cut_train + cut_eval, prior)


def choice_prior(cfg: TrainConfig, task: Task, train: list[Example]) -> dict[str, float] | None:
    """The class prior ``cfg.choice_prior`` asks evaluation to use (None: uniform)."""
    if cfg.choice_prior == "uniform":
        return None
    if not task.answer_choices:
        raise KMergeConfigError(
            f"choice_prior={cfg.choice_prior!r} is for tasks with answer choices; "
            f"task {task.name!r} has none"
        )
    return class_prior(train, task.answer_choices)


def groups(examples: list[Example], key: str) -> list[list[int]]:
    """Indices of the examples, grouped by their ``meta[key]`` (groups in order of first
    appearance)."""
    out: dict[object, list[int]] = {}
    for i, example in enumerate(examples):
        if key not in (example.meta or {}):
            raise KMergeDataError(
                f"group_by={key!r}: training example {i} has no meta field {key!r} "
                f"(its fields: {', '.join(sorted(example.meta or {})) or 'none'})"
            )
        out.setdefault(json.dumps(example.meta[key], sort_keys=True), []).append(i)
    return list(out.values())


class GroupedSampler(torch.utils.data.Sampler):
    """Every index once per epoch: the groups in a random order (drawn from ``generator``, as
    a shuffled DataLoader draws its order, so a resumed run repeats it), each group's indices
    side by side. Cut into batches, a group is split only where it crosses a batch's end, so
    a batch holds contrasting examples (a tree's true and false questions) together."""

    def __init__(self, groups: list[list[int]], generator: torch.Generator) -> None:
        self.groups, self.generator = groups, generator

    def __len__(self) -> int:
        return sum(map(len, self.groups))

    def __iter__(self) -> Iterator[int]:
        for g in torch.randperm(len(self.groups), generator=self.generator).tolist():
            yield from self.groups[g]


def balanced(examples: list[Example], seed: int) -> list[Example]:
    """The same number of examples, drawn round-robin over the answers (each class shuffled and
    cycled), so every answer is equally frequent; deterministic for a seed."""
    by_answer: dict[str, list[Example]] = {}
    for example in examples:
        by_answer.setdefault(example.answer, []).append(example)
    if len(by_answer) < 2:
        raise KMergeDataError(
            f"balance_classes needs at least two different answers, found {len(by_answer)}"
        )
    if len(by_answer) > 64:
        raise KMergeDataError(
            f"balance_classes is for labelled tasks; these examples have {len(by_answer)} "
            "different answers"
        )
    rng = random.Random(f"{seed}-balance")
    pools = [rng.sample(group, len(group)) for _, group in sorted(by_answer.items())]
    out = [pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])]
           for i in range(len(examples))]  # fmt: skip
    rng.shuffle(out)
    return out


def make_optimizer(model: KMergeModel, cfg: TrainConfig) -> torch.optim.AdamW:
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in encoder_params}
    lora_params = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": lora_params, "lr": cfg.lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr or cfg.lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: the run stopped before that update."""


METRICS_FILE = "metrics.jsonl"  # one JSON record per line: the run's history, as it goes

# Settings a resumed run may change: none of them touches the numbers the run computes.
RESUMABLE_CHANGES = (
    "output_dir", "progress", "resume", "overwrite", "save_every", "keep_checkpoints",
    "gradient_checkpointing",
)  # fmt: skip


@dataclass
class Progress:
    """Where a run stands. With the model, optimizer, scheduler and RNG states it is everything
    a checkpoint needs to continue the run exactly."""

    step: int = 0
    stage_index: int = 0
    stage_step: int = 0
    epoch: int = 0  # of the current stage
    batches_done: int = 0  # of the current epoch, on each process
    epoch_rng: str | None = None  # the shuffling generator's state when the epoch began
    window: list[float] = field(default_factory=list)  # losses since the last log record
    reconstruct_window: list[float] = field(default_factory=list)  # ... of reconstruction steps
    match_window: list[float] = field(default_factory=list)  # ... of match-only warm-up steps
    elapsed: float = 0.0  # wall seconds up to the last checkpoint, evaluation included
    eval_seconds: float = 0.0
    train_seconds: float = 0.0  # optimisation only, on the budget's clock (wall or cpu)
    teacher_seconds: float = 0.0  # of which the distillation teacher's forward passes (wall)
    final_eval: dict | None = None
    records: int = 0  # logged to metrics.jsonl (the log itself is not copied into checkpoints)

    def next_stage(self) -> None:
        self.stage_index, self.stage_step, self.window = self.stage_index + 1, 0, []
        self.reconstruct_window, self.match_window = [], []
        self.epoch, self.batches_done, self.epoch_rng = 0, 0, None


def train(cfg: TrainConfig, model: KMergeModel | None = None) -> TrainResult:
    """Train ``model`` (built from ``cfg.model`` when not given) and return it with its history.

    Runs as one process or as each process of an accelerate launch (data parallel). With
    ``save_every`` it writes a resumable checkpoint every ``save_every`` steps, and on SIGINT or
    SIGTERM finishes the step, checkpoints and raises TrainingInterrupted; ``resume`` continues
    from the newest complete checkpoint. A NaN/inf loss raises NonFiniteLossError."""
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.batch_size)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    # Every input is read and checked before anything is written: a run that fails on bad
    # data, a bad checkpoint or a taken output directory leaves that directory as it was.
    _check_output_dir(cfg, out_dir)  # before the slow part: fail early
    resume_from = checkpoint_to_resume(out_dir, cfg.resume, cfg.overwrite)
    if model is None:
        model = KMergeModel.from_base(cfg.model.base_model, cfg.model)
    if model.lora_merged:
        raise KMergeConfigError(
            "the model's LoRA is merged into its base weights (merge_lora), so LoRA would get "
            "no gradient: call model.unmerge_lora() before training"
        )
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing also works when no input requires grad (K=1, frozen
        # encoder): the inputs are embeddings, not token ids.
        model.lm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    # The first stage's data (later curriculum stages load when they start).
    first_stage = cfg.curriculum[0] if cfg.curriculum else None
    first_data = load_data(cfg, model.tokenizer, first_stage, accelerator.num_processes)
    if cfg.init_from:
        warm_start(model, cfg.init_from)
    optimizer = make_optimizer(model, cfg)
    total_steps = cfg.steps * len(cfg.curriculum or [cfg.stage])
    trainer: _Trainer | None = None
    factor = _lr_factor(cfg, total_steps, lambda: trainer.progress if trainer else Progress())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    distiller = None
    if cfg.teacher:
        from kmerge.distillation import Distiller

        if accelerator.distributed_type in _OWN_GRADIENTS:
            raise KMergeConfigError(
                "distillation (a teacher) trains in one process or on replicated weights (DDP), "
                f"not with {accelerator.distributed_type.value}"
            )
        distiller = Distiller(
            model, cfg.teacher, cfg.distill_kl_weight, cfg.distill_temperature,
            cfg.distill_hidden_weight, cfg.distill_cache, cfg.distill_prompt_weight,
            cfg.distill_prompt_layers, focal_gamma=cfg.focal_gamma,
        )  # fmt: skip
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    store_model_as_adapter(accelerator)
    trainer = _Trainer(cfg, accelerator, model, optimizer, scheduler, out_dir)
    trainer.distiller = distiller
    trainer.preloaded[0] = first_data
    if resume_from:
        trainer.resume(resume_from)
    if out_dir:
        accelerator.wait_for_everyone()  # every process has checked the directory: now write
        if accelerator.is_main_process:
            _start_output(cfg, out_dir)
    with training_attention(
        accelerator.unwrap_model(model), accelerator.mixed_precision, accelerator.device
    ):
        trainer.run()
    progress = trainer.progress
    train_seconds = progress.train_seconds  # optimisation time only
    accelerator.wait_for_everyone()
    if out_dir:
        save_model(accelerator, model, out_dir / "checkpoint")
    model = accelerator.unwrap_model(model)  # with FSDP its weights stay shards
    model.eval()
    return TrainResult(
        model, trainer.history, train_seconds, progress.step, progress.final_eval,
        progress.teacher_seconds,
    )  # fmt: skip


@contextlib.contextmanager
def training_attention(
    model: KMergeModel, mixed_precision: str, device: torch.device
) -> Iterator[None]:
    """The attention kernel to train with, and the model's own back afterwards: eager for bf16
    on the CPU, where PyTorch's flash-attention (SDPA) backward is ~5x slower than in fp32 at
    these lengths (benchmarks/bf16_cpu.py) and the eager kernel is not."""
    own = model.lm.config._attn_implementation
    if mixed_precision == "bf16" and torch.device(device).type == "cpu":
        model.lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.lm.set_attn_implementation(own)


def warm_start(model: KMergeModel, checkpoint: str | Path) -> None:
    """Load the LoRA weights (and the encoder when its shapes match) of a saved kmerge model
    into ``model``: e.g. start K=4 from a finished K=1 run. Shapes must agree exactly."""
    from kmerge.modeling import ADAPTER_FILES, ENCODER_FILE, read_safetensors

    directory = Path(checkpoint)
    adapter_file = directory / ADAPTER_FILES[1]
    if not adapter_file.is_file():
        raise KMergeConfigError(f"init_from: {directory} has no {ADAPTER_FILES[1]}")

    def read(path: Path) -> dict:
        try:
            return read_safetensors(path)[1]
        except KMergeConfigError as err:  # a truncated or foreign file: one line, named
            raise KMergeConfigError(f"init_from: {err}") from None

    saved = read(adapter_file)
    # peft saves "…lora_A.weight"; the live module holds "…lora_A.default.weight".
    own = {
        name.replace(".default", ""): param
        for name, param in model.peft_model.named_parameters()
        if "lora_" in name
    }
    missing = sorted(set(own) - set(saved))
    if missing or any(saved[n].shape != p.shape for n, p in own.items()):
        raise KMergeConfigError(
            f"init_from: the LoRA in {directory} does not match this model's (rank, target "
            f"modules or base model differ; first missing: {missing[:1]})"
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(saved[name].to(param.dtype))
        encoder_file = directory / ENCODER_FILE
        if encoder_file.is_file():
            encoder_state = read(encoder_file)
            own_encoder = model.encoder.state_dict()
            if encoder_state and {k: v.shape for k, v in encoder_state.items()} == {
                k: v.shape for k, v in own_encoder.items()
            }:
                model.encoder.load_state_dict(encoder_state)


def _lr_factor(cfg: TrainConfig, total_steps: int, progress: Callable[[], Progress]):
    """Learning-rate factor per step: linear warm-up, then cosine decay (or constant) over the
    run's progress, the larger of steps done / steps and, with a time budget, time used /
    budget. A closure, not an object: LambdaLR saves objects' attributes in checkpoints."""

    def factor(step: int) -> float:
        warmup = cfg.warmup_steps
        if step < warmup:
            return step / max(1, warmup)
        if cfg.lr_schedule == "constant":
            return 1.0
        done = run_fraction(cfg, step - warmup, total_steps - warmup, progress())
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def run_fraction(cfg: TrainConfig, step: int, total_steps: int, progress: Progress) -> float:
    """How much of the run is done: the larger of the step share and the time-budget share."""
    done = step / max(1, total_steps)
    if cfg.time_budget:
        done = max(done, progress.train_seconds / cfg.time_budget)
    return min(1.0, done)


def _clock(kind: str) -> float:
    return time.process_time() if kind == "cpu" else time.perf_counter()


class _Trainer:
    """The training loop: its state (``progress``) and the steps that move it on. Checkpoints
    and signals are the ``checkpoints``' business; sharded evaluation is ``evaluate_sharded``."""

    def __init__(self, cfg, accelerator, model, optimizer, scheduler, out_dir: Path | None):
        self.cfg, self.accelerator, self.out_dir = cfg, accelerator, out_dir
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        # One pass per curriculum stage; other tasks have one, named after the task in the logs.
        self.stages = cfg.curriculum or [cfg.stage if task_stages(cfg.task) else cfg.task]
        self.tokenizer = accelerator.unwrap_model(model).tokenizer
        self.progress = Progress()
        self.history: list[dict] = []  # every record logged, as in metrics.jsonl
        identity = _identity(cfg, accelerator, accelerator.unwrap_model(model).config)
        defaults = _identity(TrainConfig(), accelerator, KMergeConfig())
        self.checkpoints = Checkpointer(
            accelerator, out_dir, identity, cfg.checkpoint_every, cfg.keep_checkpoints, defaults
        )
        self.start = time.perf_counter()
        self.metrics_file = None
        self.bar = None
        self.distiller = None
        self.last_distill: dict[str, float] | None = None
        self.micro_distill: list[list[float]] = []  # this step's terms, per micro-batch
        self.preloaded: dict[int, TaskData] = {}  # stage index -> data loaded before the run

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _teacher_record(self) -> dict:
        record = {"teacher_seconds": self.progress.teacher_seconds}
        record.update(self.last_distill or {})  # the last step's terms, before their weights
        if self.distiller.cache is not None:
            record["teacher_cache_hits"] = self.distiller.cache_hits
        return record

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.checkpoints.catching_signals())
            if self.out_dir and acc.is_main_process:
                # A resumed run's records so far (those logged after its checkpoint go), written
                # whole before appending: the log is where a later resume finds them.
                path = self.out_dir / METRICS_FILE
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
                self.metrics_file = stack.enter_context(path.open("a"))
            # A time budget stops the run: the bar counts its seconds, not --steps, so that its
            # rate and remaining time say when the run ends.
            budget = cfg.time_budget
            self.bar = stack.enter_context(
                tqdm(
                    total=budget if budget else cfg.steps * len(self.stages),
                    initial=self.progress.train_seconds if budget else self.progress.step,
                    unit="s" if budget else "it",
                    desc=f"train K={cfg.model.k}",
                    bar_format=_TIME_BAR if budget else None,
                    disable=not (cfg.progress and acc.is_main_process),
                )
            )
            while self.progress.stage_index < len(self.stages):
                self._train_stage()
        self.metrics_file = None

    def _train_stage(self) -> None:
        cfg, p = self.cfg, self.progress
        stage = self.stages[p.stage_index]
        data = self.preloaded.pop(p.stage_index, None) or load_data(
            cfg, self.tokenizer, stage if cfg.curriculum else None, self.accelerator.num_processes
        )
        if p.stage_step == 0:  # not when resuming inside the stage: logged already
            self.log({"step": p.step, "stage": stage, "data": data.report()})
        gate = cfg.final_gate if p.stage_index == len(self.stages) - 1 else cfg.gate
        batches = self._batches(data.train)
        self.model.train()
        while True:
            started = _clock(cfg.budget_clock)
            reconstruct = self._reconstruct_step()
            match_only = not reconstruct and self._match_step()
            loss = self._optimizer_step(batches, stage, reconstruct, match_only)
            spent = _clock(cfg.budget_clock) - started
            p.train_seconds += spent
            p.step, p.stage_step = p.step + 1, p.stage_step + 1
            # never past the budget: tqdm drops a total that n overshoots, and the bar's
            # format needs it
            self.bar.update(min(spent, self.bar.total - self.bar.n) if cfg.time_budget else 1)
            if reconstruct:
                p.reconstruct_window.append(loss)
            else:
                (p.match_window if match_only else p.window).append(loss)
            self._log_loss(stage)
            done = p.stage_step == cfg.steps or self._out_of_time()
            # a warm-up that does not train the answer would only score an untrained one
            periodic = p.step % cfg.eval_every == 0 and not self._in_warmup()
            if data.held_out and (periodic or done):
                result = self._evaluate(data, stage)
                done = done or bool(cfg.curriculum) and result[result["primary_metric"]] >= gate
            if done:
                p.next_stage()  # so that a checkpoint taken now starts the next stage
            self.checkpoints.after_step(p.step, self._progress_state)
            if done:
                return

    def _out_of_time(self) -> bool:
        """The time budget is used up (agreed on by all processes, so they stop together)."""
        budget = self.cfg.time_budget
        if not budget:
            return False
        spent = torch.tensor([self.progress.train_seconds], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            spent = self.accelerator.gather(spent)
        return bool(spent.max() >= budget)

    def _done(self) -> float:
        """The share of the whole run (every stage) done: of its steps, or of its time budget."""
        p = self.progress
        return run_fraction(self.cfg, p.step, self.cfg.steps * len(self.stages), p)

    def _reconstruct_step(self) -> bool:
        """Whether this optimizer step repeats the merged prompt instead of answering: every
        step of the warm-up share of the run, then ``reconstruct_share`` of the steps."""
        if self._done() < self.cfg.reconstruct_warmup:
            return True
        return is_reconstruction_step(self.progress.step, self.cfg.reconstruct_share)

    def _match_step(self) -> bool:
        """Whether this optimizer step trains only the prompt match (its warm-up share)."""
        return self.distiller is not None and self._done() < self.cfg.distill_match_warmup

    def _distilled(self, reconstruct: bool) -> bool:
        """Whether this step runs the distiller: a teacher, not a reconstruction step, and the
        run not yet past ``distill_until``."""
        teacher_left = self.distiller is not None and self._done() < self.cfg.distill_until
        return teacher_left and not reconstruct

    def _in_warmup(self) -> bool:
        """Whether the run is inside a warm-up share that trains no answers (reconstruction
        or prompt match only): the next step is one of its steps."""
        return self._done() < self.cfg.reconstruct_warmup or self._match_step()

    def _step_k(self) -> int | None:
        """The K of this optimizer step: from k_choices, drawn (seeded by the step, so a resumed
        run draws the same) or by the share of the run done; else the model's."""
        choices, p = self.cfg.k_choices, self.progress
        if not choices:
            return None
        if self.cfg.k_order == "schedule":
            return choices[min(len(choices) - 1, int(self._done() * len(choices)))]
        return random.Random(f"{self.cfg.seed}-k-{p.step}").choice(choices)

    def _batches(self, examples: list[Example]) -> Iterator[list[Example]]:
        """This stage's batches, epoch after epoch. The data position is kept in ``progress``
        so that a resumed run gets the same batches in the same order."""
        cfg, p, acc = self.cfg, self.progress, self.accelerator
        if not examples:
            raise KMergeDataError("no training examples to train on")
        generator = torch.Generator().manual_seed(cfg.seed + p.stage_index)
        order = {"shuffle": True, "generator": generator}
        if cfg.group_by:
            order = {"sampler": GroupedSampler(groups(examples, cfg.group_by), generator)}
        loader = DataLoader(
            examples,
            batch_size=cfg.batch_size,  # per process
            collate_fn=list,
            drop_last=len(examples) >= cfg.batch_size,
            **order,
        )
        loader = acc.prepare(loader)  # with several processes: each its own batches
        while True:
            if p.epoch_rng is None:  # a new epoch: note the state its order is drawn from
                p.epoch_rng = _encode_rng(generator.get_state())
                epoch = loader
            else:  # resuming inside an epoch: draw the same order, skip the batches used
                generator.set_state(_decode_rng(p.epoch_rng))
                epoch = acc.skip_first_batches(loader, p.batches_done)
            for batch in epoch:
                p.batches_done += 1
                yield batch
            p.epoch, p.batches_done, p.epoch_rng = p.epoch + 1, 0, None

    def _optimizer_step(
        self,
        batches: Iterator[list[Example]],
        stage: str,
        reconstruct: bool = False,
        match_only: bool = False,
    ) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the loss averaged over
        the micro-batches and the processes (what one process with the whole batch logs).
        ``reconstruct``: the batch's prompts are to be repeated instead of answered;
        ``match_only``: the step trains only the distiller's prompt match."""
        acc, cfg = self.accelerator, self.cfg
        step_loss = 0.0
        k = self._step_k()
        if not reconstruct and not self._distilled(reconstruct):
            self.last_distill = None  # past distill_until: no terms to log
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            if reconstruct:
                batch = [reconstruction_example(e, cfg.reconstruct_objective) for e in batch]
            with acc.accumulate(self.model):
                try:
                    total = self._loss(batch, k, reconstruct, match_only)
                except KMergeDataError as err:  # e.g. a prompt too long: name its row
                    raise name_example(err, batch) from None
                loss = acc.reduce(total.detach(), "mean").item()  # the same on every process
                if not math.isfinite(loss):  # before the update: the weights stay good
                    raise NonFiniteLossError(self._non_finite_message(loss, stage))
                acc.backward(total)
                if acc.sync_gradients and self._outside_ddp(reconstruct):
                    average_gradients(self.model)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients:  # once per optimizer step, however many processes
                    self.scheduler.step()
                self.optimizer.zero_grad()
            step_loss += loss / cfg.grad_accum
        if self.micro_distill:  # the terms' means over micro-batches and processes, as the loss
            terms = acc.reduce(torch.tensor(self.micro_distill, device=acc.device).mean(0), "mean")
            names = ("distill_kl", "distill_hidden", "distill_prompt")
            self.last_distill = dict(zip(names, terms.tolist()))
            self.micro_distill = []
        return step_loss

    def _outside_ddp(self, reconstruct: bool) -> bool:
        """Whether this step's backward ran outside DDP's sync: several processes, and the
        distiller's forward through the unwrapped model (a reconstruction step goes through
        the wrapper, like a step without a teacher)."""
        return self._distilled(reconstruct) and self.accelerator.num_processes > 1

    def _loss(
        self, batch: list[Example], k: int | None, reconstruct: bool, match_only: bool
    ) -> torch.Tensor:
        """The loss of one micro-batch, its forward passes (student and any teacher) under the
        run's mixed precision: autocast here, because the distiller calls the unwrapped model,
        whose forward accelerate does not wrap."""
        prompts, answers = [e.prompt for e in batch], [e.answer for e in batch]
        protect = example_protect_spans(batch)
        with self.accelerator.autocast():
            if self._distilled(reconstruct):
                model = self.accelerator.unwrap_model(self.model)
                result = self.distiller(model, prompts, answers, k, protect, match_only=match_only)
                self.progress.teacher_seconds += result.teacher_seconds
                self.micro_distill.append([result.kl, result.hidden, result.prompt_hidden])
                return result.loss
            options = {"k": k} if k else {}
            if protect:
                options["protect"] = protect
            output = self.model(prompts, answers, **options)
            # reconstruction steps keep plain cross-entropy: every token is a target
            return output.loss if reconstruct else output.focal_loss(self.cfg.focal_gamma)

    def _non_finite_message(self, loss: float, stage: str) -> str:
        latest = self.checkpoints.latest
        kept = (
            f"the last good checkpoint is {latest}"
            if latest
            else "no checkpoint was written before it"
        )
        return (
            f"loss became {loss} at step {self.progress.step + 1} (stage {stage}); "
            f"stopped before that update, {kept}"
        )

    def _log_loss(self, stage: str) -> None:
        """Every ``log_every`` steps: the mean task loss (and reconstruction loss) since the
        last record."""
        p = self.progress
        if p.step % self.cfg.log_every == 0:
            record = {"step": p.step, "stage": stage}
            if p.window:
                record["loss"] = sum(p.window) / len(p.window)
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", stage=stage)
            if p.reconstruct_window:
                record["reconstruct_loss"] = sum(p.reconstruct_window) / len(p.reconstruct_window)
            if p.match_window:  # the weighted distance of match-only steps: not a task loss
                record["match_loss"] = sum(p.match_window) / len(p.match_window)
            self.log(
                {
                    **record, "lr": self.scheduler.get_last_lr()[0],
                    "elapsed": self.elapsed(), "train_seconds": p.train_seconds,
                    **(self._teacher_record() if self.distiller else {}),
                }
            )  # fmt: skip
            p.window, p.reconstruct_window, p.match_window = [], [], []

    def _evaluate(self, data: TaskData, stage: str) -> dict:
        """Held-out metrics (every process evaluates a shard), logged."""
        p = self.progress
        final_eval = evaluate_sharded(
            self.accelerator, self.model, data.held_out, data.task, data.choice_prior
        )
        primary = final_eval["primary_metric"]
        p.eval_seconds += final_eval["eval_seconds"]
        p.final_eval = final_eval
        self.model.train()
        self.log(
            {
                "step": p.step,
                "stage": stage,
                **{
                    f"eval_{name}": value
                    for name, value in final_eval.items()
                    if isinstance(value, float) and name != "eval_seconds"
                },
                "elapsed": self.elapsed(),
                "train_seconds": p.train_seconds,
            }
        )
        if self.accelerator.is_main_process:
            self.bar.write(
                f"step {p.step} stage {stage}: held-out {primary} {final_eval[primary]:.3f}"
            )
        return final_eval

    # ------------------------------------------------------------------ checkpoints
    def _progress_state(self) -> dict:
        """What a checkpoint taken now saves of the run's progress (with the log on disk)."""
        p = self.progress
        p.elapsed, p.records = self.elapsed(), len(self.history)
        if self.metrics_file:  # the records the checkpoint counts are on disk before it is
            os.fsync(self.metrics_file.fileno())
        return dataclasses.asdict(p)

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: refused if another run wrote it."""
        saved = self.checkpoints.resume(path)
        history = saved.pop("history", None)  # checkpoints of earlier versions carried the log
        self.progress = Progress(**saved)
        if history is None:
            history = read_history(self.out_dir / METRICS_FILE, self.progress.records, path)
        self.history = history
        self.start = time.perf_counter() - self.progress.elapsed
        self.history.append({"step": self.progress.step, "resumed_from": str(path)})


def _identity(cfg: TrainConfig, accelerator: Accelerator, model_config: KMergeConfig) -> dict:
    """What a checkpoint and the run that resumes it must agree on."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    identity = {
        "config": settings,
        "model": model_config.to_dict(),
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
    }
    return as_json(identity)


# What a run writes in its output directory (besides metrics.jsonl, train_config.json).
RUN_OUTPUTS = ("checkpoint", "checkpoints", "results.json")


def _check_output_dir(cfg: TrainConfig, out_dir: Path | None) -> None:
    """Refuse an output directory that is a file, or that already holds files, unless they are
    an interrupted run to ``resume`` (checked against its checkpoint), an unfinished run of the
    same settings that left no checkpoint (it starts again), or ``overwrite`` says to replace
    them. Nothing is written here."""
    if out_dir is None:
        return
    for path in (out_dir, *out_dir.parents):  # the nearest existing one must be a directory
        if path.exists():
            if not path.is_dir():
                raise KMergeConfigError(f"output directory {out_dir}: {path} is not a directory")
            break
    if not out_dir.is_dir() or cfg.overwrite or cfg.resume:
        return
    names = sorted(p.name for p in out_dir.iterdir())
    if not names or (out_dir / "checkpoints").is_dir():
        return  # empty, or checkpoints: checkpoint_to_resume decides
    if _unfinished_run_of(cfg, out_dir, names):
        return
    finished = [n for n in RUN_OUTPUTS if n in names]
    if "train_config.json" in names and finished:
        what = f"a finished run ({', '.join(finished)})"
    elif "train_config.json" in names:
        what = "another run (its train_config.json has other settings)"
    else:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f"other files ({shown})"
    raise KMergeConfigError(
        f"output directory {out_dir} already holds {what}: pass --overwrite to replace it, "
        "or use another output directory"
    )


def _unfinished_run_of(cfg: TrainConfig, out_dir: Path, names: list[str]) -> bool:
    """``out_dir`` holds only what a run with these settings writes before its first
    checkpoint (it failed or was killed early): starting it again loses nothing."""
    if not set(names) <= {"train_config.json", "metrics.jsonl"} or "train_config.json" not in names:
        return False
    try:
        saved = json.loads((out_dir / "train_config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict):
        return False
    current = as_json(cfg.to_dict())
    return not differences(
        {k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES},
        {k: v for k, v in current.items() if k not in RESUMABLE_CHANGES},
    )


def _start_output(cfg: TrainConfig, out_dir: Path) -> None:
    """Create the output directory and record the settings (atomically); with ``overwrite``
    an earlier run's checkpoints, model and results go first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        for name in RUN_OUTPUTS:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    write_json(out_dir / "train_config.json", cfg.to_dict())


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
