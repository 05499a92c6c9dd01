"""Distillation from an uncompressed teacher at the positions that predict answer tokens.

The student reads the merged prompt; the teacher (a K=1 kmerge checkpoint, or the base model
with the adapters off) reads the plain prompt. Both are fed the same answer tokens, so their
answer-predicting positions correspond one to one. The loss adds to the student's
cross-entropy (xRAG, arXiv 2405.13792):

- ``kl_weight`` x KL(teacher || student) of the next-token distributions at temperature T
  (scaled by T^2, Hinton et al.);
- ``hidden_weight`` x the mean over decoder layers of |h_s - h_t|_1 / |h_t|_1 at those positions
  (Deep Context Distillation, arXiv 2503.08727).

With ``cache`` the teacher's outputs are kept per (prompt, answer), in float16 on the CPU, so
a training set seen several times (``--n-train``) pays for each teacher forward once. Memory:
examples x answer tokens x (vocab + layers x hidden) x 2 bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kmerge.errors import KMergeConfigError
from kmerge.modeling import KMergeModel, KMergeOutput


@dataclass
class TeacherStates:
    logits: torch.Tensor  # [answer tokens, vocab]
    hidden: list[torch.Tensor] | None  # per decoder layer: [answer tokens, H]

    def to(self, dtype: torch.dtype, device: torch.device | str) -> TeacherStates:
        hidden = [h.to(device, dtype) for h in self.hidden] if self.hidden is not None else None
        return TeacherStates(self.logits.to(device, dtype), hidden)


@dataclass
class DistillResult:
    output: KMergeOutput  # the student's own cross-entropy, per example
    loss: torch.Tensor  # cross-entropy + the weighted distillation terms
    kl: float
    hidden: float
    teacher_seconds: float


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
    ) -> None:
        if temperature <= 0:
            raise KMergeConfigError(f"distillation temperature must be > 0, got {temperature}")
        if kl_weight < 0 or hidden_weight < 0:
            raise KMergeConfigError("distillation weights must be >= 0")
        self.kl_weight, self.temperature, self.hidden_weight = kl_weight, temperature, hidden_weight
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

    def _teacher_forward(
        self, student: KMergeModel, prompts: Sequence[str], answers: Sequence[str]
    ) -> list[TeacherStates]:
        """The teacher's states at each example's answer positions, one entry per example."""
        layers = self.hidden_weight > 0
        with torch.no_grad():
            if self.model is not None:
                states = self.model.answer_states(self.model.prepare(prompts, answers, k=1), layers)
            else:
                with student.peft_model.disable_adapter():
                    states = student.answer_states(student.prepare(prompts, answers, k=1), layers)
        counts = states.output.answer_tokens.tolist()
        logits = states.logits.split(counts)
        hidden = [h.split(counts) for h in states.hidden] if layers else None
        return [
            TeacherStates(logits[i], [h[i] for h in hidden] if hidden else None)
            for i in range(len(counts))
        ]

    def _teacher_states(
        self, student: KMergeModel, prompts: Sequence[str], answers: Sequence[str]
    ) -> TeacherStates:
        """The teacher's states for the batch, in batch order (from the cache where it has
        them: one forward for the examples it has not seen)."""
        if self.cache is None:
            per_example = self._teacher_forward(student, prompts, answers)
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
        hidden = None
        if per_example[0].hidden is not None:
            hidden = [torch.cat(layer) for layer in zip(*(s.hidden for s in per_example))]
        return TeacherStates(torch.cat([s.logits for s in per_example]), hidden)

    def __call__(
        self,
        student: KMergeModel,
        prompts: Sequence[str],
        answers: Sequence[str],
        k: int | None = None,
        protect: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> DistillResult:
        started = time.perf_counter()
        teacher = self._teacher_states(student, prompts, answers)
        teacher_seconds = time.perf_counter() - started
        batch = student.prepare(prompts, answers, k=k, protect=protect)
        own = student.answer_states(batch, self.hidden_weight > 0)
        loss = own.output.loss
        kl = hidden = torch.zeros((), device=loss.device)
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
            per_layer = [
                (s - h).abs().sum(-1) / h.abs().sum(-1).clamp(min=1e-6)
                for s, h in zip(own.hidden, teacher.hidden)
            ]
            hidden = torch.stack([d.mean() for d in per_layer]).mean()
            loss = loss + self.hidden_weight * hidden
        return DistillResult(
            own.output, loss, float(kl.detach()), float(hidden.detach()), teacher_seconds
        )
