"""Distillation from an uncompressed teacher at the positions that predict answer tokens.

The student reads the merged prompt; the teacher (a K=1 kmerge checkpoint, or the base model
with the adapters off) reads the plain prompt. Both are fed the same answer tokens, so their
answer-predicting positions correspond one to one. The loss adds to the student's
cross-entropy (xRAG, arXiv 2405.13792):

- ``kl_weight`` x KL(teacher || student) of the next-token distributions at temperature T
  (scaled by T^2, Hinton et al.);
- ``hidden_weight`` x the mean over decoder layers of |h_s - h_t|_1 / |h_t|_1 at those positions
  (Deep Context Distillation, arXiv 2503.08727);
- ``prompt_weight`` x the same distance inside the prompt: each merged position against the
  teacher's state at the last token of its block, where a causal model has read the block.
  A dense signal (every block, every layer) that asks merged positions to carry what the plain
  prompt's tokens carry, so that the layers above read them as they read tokens. The first
  prompt position (where models park attention) and the last (it predicts the answer) are
  left out; the first also after a BOS (``prepend_bos``), where matching it measured worse on
  the tree (docs/quality.md, "An unmerged BOS first"). ``prompt_layers`` = N matches only the
  first N decoder layers (the layers that turn what a position holds into what the layers
  above read); with no answer terms the teacher then runs only those N layers.

``match_only`` (a warm-up): the loss is the prompt term alone, and the student too runs only
the matched layers, so a step costs a fraction of a full one; the merged positions move
towards the plain prompt's states before the task is learnt on top of them.

With ``cache`` the teacher's outputs are kept per (prompt, answer), in float16 on the CPU, so
a training set seen several times (``--n-train``) pays for each teacher forward once. Memory:
examples x answer tokens x (vocab + layers x hidden) x 2 bytes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kmerge.errors import KMergeConfigError
from kmerge.modeling import KMergeModel, KMergeOutput
from kmerge.models import first_decoder_layers


@dataclass
class TeacherStates:
    logits: torch.Tensor  # [answer tokens, vocab]
    hidden: list[torch.Tensor] | None  # per decoder layer: [answer tokens, H]
    prompt_hidden: list[torch.Tensor] | None = None  # per decoder layer: [prompt tokens, H]

    def to(self, dtype: torch.dtype, device: torch.device | str) -> TeacherStates:
        def move(states: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return [h.to(device, dtype) for h in states] if states is not None else None

        return TeacherStates(
            self.logits.to(device, dtype), move(self.hidden), move(self.prompt_hidden)
        )


def normalised_distance(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean over positions of |h_s - h_t|_1 / |h_t|_1."""
    per_layer = [
        ((s - t).abs().sum(-1) / t.abs().sum(-1).clamp(min=1e-6)).mean()
        for s, t in zip(student, teacher)
    ]
    return torch.stack(per_layer).mean()


@dataclass
class DistillResult:
    output: KMergeOutput  # the student's own cross-entropy, per example
    loss: torch.Tensor  # cross-entropy + the weighted distillation terms
    kl: float
    hidden: float
    teacher_seconds: float
    prompt_hidden: float = 0.0


class Distiller:
    """Computes the distillation loss of a student against a fixed, uncompressed teacher.

    ``teacher``: a directory written by ``save_pretrained`` or a loaded KMergeModel (its LoRA
    is folded into its own copy of the base weights), or ``"base"``: the student's base model
    with its adapters off, fed the plain prompt (no second copy of the weights)."""

    def __init__(
        self,
        student: KMergeModel,
        teacher: str | KMergeModel,
        kl_weight: float = 1.0,
        temperature: float = 1.0,
        hidden_weight: float = 0.0,
        cache: bool = False,
        prompt_weight: float = 0.0,
        prompt_layers: int = 0,
        *,
        focal_gamma: float = 0.0,
    ) -> None:
        if temperature <= 0:
            raise KMergeConfigError(f"distillation temperature must be > 0, got {temperature}")
        if kl_weight < 0 or hidden_weight < 0 or prompt_weight < 0:
            raise KMergeConfigError("distillation weights must be >= 0")
        if student.config.token_dropout:
            # the teacher's plain prompt would lose other tokens than the student's
            raise KMergeConfigError("token_dropout cannot be combined with a teacher")
        self.kl_weight, self.temperature, self.hidden_weight = kl_weight, temperature, hidden_weight
        self.prompt_weight = prompt_weight
        self.focal_gamma = focal_gamma  # of the student's own answer-token loss
        if prompt_layers < 0:
            raise KMergeConfigError(f"prompt_layers must be >= 0 (0: all), got {prompt_layers}")
        self.prompt_layers = prompt_layers or None  # None: every layer
        self.model: KMergeModel | None = None
        # (prompt, answer) -> the teacher's logits and hidden states at its answer positions
        self.cache: dict[tuple[str, str], TeacherStates] | None = {} if cache else None
        self.cache_hits = 0
        if isinstance(teacher, str) and teacher != "base":
            teacher = KMergeModel.from_pretrained(teacher)
        if isinstance(teacher, KMergeModel):
            self.model = teacher.merge_lora().eval()
            self.model.requires_grad_(False)
            if self.model.config.base_fingerprint != student.config.base_fingerprint:
                raise KMergeConfigError(
                    f"teacher {teacher} was trained on another base model than the student's"
                )

    def _matched_layers_only(self, model: KMergeModel):
        """Inside the block ``model``'s decoder runs only the layers the prompt term needs: one
        more than matched, since the decoder's last hidden state comes normed."""
        return first_decoder_layers(model.lm, self.prompt_layers + 1)

    def _teacher_forward(
        self,
        student: KMergeModel,
        prompts: Sequence[str],
        answers: Sequence[str],
        match_only: bool = False,
    ) -> list[TeacherStates]:
        """The teacher's states at each example's answer positions (and, with a prompt weight,
        at every prompt token), one entry per example. ``match_only``: only the prompt states
        are needed (the logits that come out are meaningless)."""
        layers = self.hidden_weight > 0 and not match_only
        model = self.model if self.model is not None else student
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if self.model is None:
                stack.enter_context(student.peft_model.disable_adapter())
            if self.prompt_layers and (match_only or not (self.kl_weight or layers)):  # unused
                stack.enter_context(self._matched_layers_only(model))
            batch = model.prepare(prompts, answers, k=1)
            every_token = [range(len(ends)) for ends in batch.block_ends]
            states = model.answer_states(batch, layers, every_token if self.prompt_weight else None)
        counts = states.output.answer_tokens.tolist()
        logits = states.logits.split(counts)
        hidden = [h.split(counts) for h in states.hidden] if layers else None
        prompt = None
        if self.prompt_weight:
            prompt = [
                h.split([len(ends) for ends in batch.block_ends])
                for h in states.prompt_hidden[: self.prompt_layers]
            ]
        return [
            TeacherStates(
                logits[i],
                [h[i] for h in hidden] if hidden else None,
                [h[i] for h in prompt] if prompt else None,
            )
            for i in range(len(counts))
        ]

    def _teacher_states(
        self,
        student: KMergeModel,
        prompts: Sequence[str],
        answers: Sequence[str],
        match_only: bool = False,
    ) -> list[TeacherStates]:
        """The teacher's states per example, in batch order (from the cache where it has
        them: one forward for the examples it has not seen). A match-only step's states are
        partial: they are not cached."""
        if self.cache is None or match_only:
            per_example = self._teacher_forward(student, prompts, answers, match_only)
        else:
            keys = list(zip(prompts, answers))
            missing = [i for i, key in enumerate(keys) if key not in self.cache]
            self.cache_hits += len(keys) - len(missing)
            if missing:
                fresh = self._teacher_forward(
                    student, [prompts[i] for i in missing], [answers[i] for i in missing]
                )
                for i, states in zip(missing, fresh):
                    self.cache[keys[i]] = states.to(torch.float16, "cpu")
            device = student.device
            per_example = [self.cache[key].to(torch.float32, device) for key in keys]
        return per_example

    def __call__(
        self,
        student: KMergeModel,
        prompts: Sequence[str],
        answers: Sequence[str],
        k: int | None = None,
        protect: Sequence[Sequence[tuple[int, int]]] | None = None,
        match_only: bool = False,
    ) -> DistillResult:
        if match_only and not (self.prompt_weight and self.prompt_layers):
            raise KMergeConfigError(
                "a match-only step needs the prompt term over the first N layers: "
                "prompt_weight > 0 and prompt_layers > 0"
            )
        started = time.perf_counter()
        per_example = self._teacher_states(student, prompts, answers, match_only)
        teacher_seconds = time.perf_counter() - started
        batch = student.prepare(prompts, answers, k=k, protect=protect)
        positions = self._aligned_positions(batch, per_example) if self.prompt_weight else None
        if match_only:
            with self._matched_layers_only(student):
                own = student.answer_states(batch, False, positions)
            # the answer's cross-entropy read off a cut decoder means nothing: left out
            loss = torch.zeros((), device=own.logits.device)
        else:
            own = student.answer_states(batch, self.hidden_weight > 0, positions)
            loss = own.output.focal_loss(self.focal_gamma)
        kl = hidden = prompt = torch.zeros((), device=loss.device)
        if self.prompt_weight and any(positions):
            # the teacher's state at the last token of each aligned block
            targets = [
                torch.cat(
                    [t.prompt_hidden[layer][[batch.block_ends[i][j] for j in row]]
                     for i, (t, row) in enumerate(zip(per_example, positions))]
                )
                for layer in range(len(per_example[0].prompt_hidden))
            ]  # fmt: skip
            prompt = normalised_distance(own.prompt_hidden[: len(targets)], targets)
            loss = loss + self.prompt_weight * prompt
        if match_only:
            matched = float(prompt.detach())
            return DistillResult(own.output, loss, 0.0, 0.0, teacher_seconds, matched)
        teacher = TeacherStates(
            torch.cat([s.logits for s in per_example]),
            [torch.cat(layer) for layer in zip(*(s.hidden for s in per_example))]
            if self.hidden_weight
            else None,
        )
        if self.kl_weight:
            t = self.temperature
            kl = F.kl_div(
                F.log_softmax(own.logits.float() / t, dim=-1),
                F.log_softmax(teacher.logits.float() / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            ) * (t * t)
            loss = loss + self.kl_weight * kl
        if self.hidden_weight:
            hidden = normalised_distance(own.hidden, teacher.hidden)
            loss = loss + self.hidden_weight * hidden
        return DistillResult(
            own.output, loss, float(kl.detach()), float(hidden.detach()), teacher_seconds,
            float(prompt.detach()),
        )  # fmt: skip

    @staticmethod
    def _aligned_positions(batch, per_example: list[TeacherStates]) -> list[list[int]]:
        """Per example, the prompt positions whose states are matched to the teacher's: all
        but the first and the last (see the module's docstring)."""
        for i, (ends, teacher) in enumerate(zip(batch.block_ends, per_example)):
            if ends[-1] + 1 != len(teacher.prompt_hidden[0]):
                raise KMergeConfigError(
                    f"example {i}: the student's prompt has {ends[-1] + 1} tokens, the "
                    f"teacher's {len(teacher.prompt_hidden[0])}: they must tokenise alike "
                    "(same tokenizer, no prompt compressor)"
                )
        return [list(range(1, len(ends) - 1)) for ends in batch.block_ends]
