"""How well can the LM answer when, above layer L, it reads only the plain prompt's block ends?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/late_merge_bound.py --layers 8 --steps 5000 \
        --train-steps 150 --eval-every 50 --seed 0 --output runs/q/bound-l8-s0.json

(``--steps 5000``: the held-out questions and schedule of the K=1 runs ``z7-k1-2500-s0``.)
Amazon Reviews, at K=1's step count of a 20-CPU-minute run, in bf16:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/late_merge_bound.py --task amazon_reviews \
        --data-dir ../shared/data/amazon_reviews --max-prompt-tokens 96 --batch-size 16 \
        --balance-classes --bf16 --layers 8 --steps 230 --eval-every 1000 --seed 0 \
        --output runs/q/bound-amz-l8-s0.json

Prompt distillation (``--teacher base``) asks each merged position to hold, in the first L
layers, what the plain prompt holds at its block's last token. This script trains the case
where that match is perfect: the uncompressed prompt runs through the first L decoder layers
as usual, and from layer L on every position may attend only to the K-blocks' last tokens
(the segments layout of ``--k 4 --block-alignment segments``) and to the answer tokens, so
what the answer reads above layer L is exactly the teacher's states at the merged positions.
It is an upper bound for prompt distillation over L layers, not a compression method: the
first L layers still run at the full length. L = 0 is K-Token Merging's layout with each
block replaced by its last token's embedding (token dropping).

Same data, held-out examples, LoRA, optimiser and schedule as ``kmerge train --stage small
--steps STEPS`` (or ``--task ...`` with the data flags given here) with the given seed (the
held-out trees depend on ``--steps``). Accuracy is choice accuracy (the task's answer choices,
"true" against "false" on the tree, by answer likelihood), with ROC-AUC for two choices,
evaluated every ``--eval-every`` steps; the process's CPU seconds of optimisation are logged
with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from kmerge.evaluation import choice_auc
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.training import (
    Progress,
    TrainConfig,
    _lr_factor,
    load_data,
    make_optimizer,
    training_attention,
)


def keep_mask(model: KMergeModel, prompts: list[str], batch) -> torch.Tensor:
    """[B, 1, T, T] additive mask: causal, real keys only, and of the prompt only its block
    ends."""
    real = batch.attention_mask.bool()  # batches are left-padded
    t = real.shape[1]
    keep = real.clone()
    for i, spans in enumerate(model.prompt_layouts(prompts)):
        start = batch.prompt_starts[i]
        keep[i, start : start + batch.prompt_tokens[i]] = False
        keep[i, [start + end - 1 for _, end, _ in spans]] = True
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal & keep[:, None, :]
    mask |= torch.eye(t, dtype=torch.bool)  # a position always sees itself: no empty rows
    # additive, as eager attention adds it to the scores (sdpa takes either form)
    dtype = batch.inputs_embeds.dtype
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)[:, None]


class LateMask:
    """Swaps the attention mask of decoder layers >= L for the block-end mask of the batch."""

    def __init__(self, model: KMergeModel, layers: int) -> None:
        self.mask: torch.Tensor | None = None
        self.handles = [
            layer.register_forward_pre_hook(self._hook, with_kwargs=True)
            for layer in model.lm.get_decoder().layers[layers:]
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, module, args, kwargs):
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask
        return args, kwargs


def answer_nll(model: KMergeModel, late: LateMask, prompts: list[str], answers: list[str]):
    batch = model.prepare(prompts, answers, k=1)
    late.mask = keep_mask(model, prompts, batch)
    try:
        return model.loss(batch)
    finally:
        late.mask = None


@torch.no_grad()
def choice_scores(model, late, examples, choices, batch_size=32) -> dict[str, float]:
    """Choice accuracy (the likelier answer) and, for two choices, ROC-AUC of the difference
    of their negative log-likelihoods."""
    model.eval()
    nll = []  # per example, per choice
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [e.prompt for e in chunk]
        per_choice = []
        for choice in choices:
            out = answer_nll(model, late, prompts, [choice] * len(chunk))
            per_choice.append((out.example_losses * out.answer_tokens).tolist())
        nll += list(zip(*per_choice))
    model.train()
    best = [choices[min(range(len(choices)), key=row.__getitem__)] for row in nll]
    out = {"accuracy": sum(b == e.answer for b, e in zip(best, examples)) / len(examples)}
    if len(choices) == 2:
        records = [{"choice_nll": dict(zip(choices, row)), "answer": e.answer}
                   for row, e in zip(nll, examples)]  # fmt: skip
        out["auc"] = choice_auc(records, choices)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="L: layers that read every token")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="the run whose data to use")
    parser.add_argument("--train-steps", type=int, default=None, help="stop early (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-eval", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--task", default="tree")
    parser.add_argument("--data-dir", default=None, help="the task's data (not for the tree)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--balance-classes", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, eager attention")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    cfg = TrainConfig(
        task=args.task, task_options={"data_dir": args.data_dir} if args.data_dir else {},
        stage="small", steps=args.steps, seed=args.seed,
        n_eval=args.n_eval, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
        balance_classes=args.balance_classes,
        model=KMergeConfig(k=args.k, block_alignment="segments"),
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = KMergeModel.from_base(cfg.model.base_model, cfg.model)
    data = load_data(dataclasses.replace(cfg, output_dir=None), model.tokenizer)
    # as kmerge train: eager attention for bf16 on a CPU
    with training_attention(model, "bf16" if args.bf16 else "no", model.device):
        train_and_score(args, cfg, model, data)


def epoch_batches(examples: list, batch_size: int, seed: int) -> Iterator[list]:
    """Full batches, epoch after epoch, each epoch in its own shuffled order (the first one
    shuffled with ``seed``, epoch e with ``seed + e``)."""
    if len(examples) < batch_size:
        raise SystemExit(f"{len(examples)} training examples: fewer than one batch of {batch_size}")
    for epoch in itertools.count():
        order = list(examples)
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def train_and_score(args: argparse.Namespace, cfg: TrainConfig, model: KMergeModel, data) -> None:
    """Train the LoRA under the late mask; score the held-out choices every ``eval_every``."""
    choices = tuple(data.task.answer_choices or ("true", "false"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    late = LateMask(model, args.layers)
    opt = make_optimizer(model, cfg)  # the encoder gets no gradient: only the LoRA moves
    params = [p for group in opt.param_groups for p in group["params"]]
    # no time budget: the schedule follows the step share alone
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, cfg.steps, Progress))
    batches = epoch_batches(list(data.train), cfg.batch_size, cfg.seed)
    records, cpu = [], 0.0
    model.train()
    for step in range(1, (args.train_steps or cfg.steps) + 1):
        chunk = next(batches)
        started = time.process_time()
        prompts, answers = [e.prompt for e in chunk], [e.answer for e in chunk]
        with autocast:
            loss = answer_nll(model, late, prompts, answers).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        cpu += time.process_time() - started
        if step % args.eval_every == 0 or step == (args.train_steps or cfg.steps):
            with autocast:
                scores = choice_scores(model, late, data.held_out, choices)
            record = {"step": step, "loss": float(loss.detach()), "cpu_seconds": cpu}
            records.append(record | scores)
            print(json.dumps(records[-1]), flush=True)
            args.output.write_text(json.dumps({"args": vars(args) | {"output": str(args.output)},
                                               "records": records}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
