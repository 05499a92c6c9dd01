"""Self-information token dropping (the Selective Context / LLMLingua-1 idea), offline.

Each prompt token is scored by its surprisal ``-log p(token | previous tokens)`` under the
frozen base model itself (LoRA adapters disabled, so the scores never change during training);
the ``ceil(n / ratio)`` most surprising tokens are kept in their original order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kmerge.errors import KMergeConfigError
from kmerge.methods.base import TokenSelector, register_method
from kmerge.models import lm_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kmerge.modeling import KMergeModel

MAX_CACHED_PROMPTS = 200_000  # a few MB of floats; training revisits the same prompts each epoch


@torch.no_grad()
def token_surprisal(
    lm: PreTrainedModel, prompt_ids: Sequence[Sequence[int]], start_id: int, batch_size: int = 16
) -> list[list[float]]:
    """Surprisal in nats of every token of every prompt under the causal LM ``lm``.

    Each prompt is read after ``start_id`` (a BOS/document-start token), so its first token
    is scored too. Prompts are right-padded in batches; the LM head runs one prompt at a time,
    so memory stays at one prompt's ``[n, vocab]`` logits.
    """
    device = lm.get_input_embeddings().weight.device
    scores: list[list[float]] = []
    for b in range(0, len(prompt_ids), batch_size):
        chunk = [[start_id, *ids] for ids in prompt_ids[b : b + batch_size]]
        width = max(len(row) for row in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.as_tensor(row, device=device)
            mask[i, : len(row)] = 1
        hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, row in enumerate(chunk):
            n = len(row) - 1  # position t predicts token t + 1
            logprobs = F.log_softmax(lm_logits(lm, hidden[i, :n]).float(), dim=-1)
            target = ids[i, 1 : n + 1].unsqueeze(-1)
            scores.append((-logprobs.gather(-1, target).squeeze(-1)).tolist())
    return scores


@register_method("self_information")
class SelfInformation(TokenSelector):
    """Drop the tokens the base model finds least surprising (ties: the earlier one is kept)."""

    def __init__(self, ratio: float | None = None, seed: int = 0) -> None:
        super().__init__(ratio, seed)
        self._cache: dict[tuple[int, ...], list[float]] = {}

    def compress(
        self, prompt_ids: Sequence[Sequence[int]], model: KMergeModel | None = None
    ) -> list[list[int]]:
        if model is None:
            raise KMergeConfigError("self_information scores tokens with the base model: pass it")
        self.scores(prompt_ids, model)  # fills the cache that select reads
        return super().compress(prompt_ids, model)

    def scores(self, prompt_ids: Sequence[Sequence[int]], model: KMergeModel) -> list[list[float]]:
        """Each prompt token's surprisal under the frozen base model, cached per prompt."""
        keys = list(dict.fromkeys(tuple(ids) for ids in prompt_ids))
        todo = [k for k in keys if k not in self._cache]
        if len(self._cache) + len(todo) > MAX_CACHED_PROMPTS:
            self._cache.clear()
            todo = keys
        if todo:
            self._cache.update(zip(todo, self._score(model, todo)))
        return [self._cache[tuple(ids)] for ids in prompt_ids]

    def select(self, ids: list[int], keep: int) -> list[int]:
        scores = self._cache[tuple(ids)]
        return sorted(range(len(ids)), key=lambda i: (-scores[i], i))[:keep]

    @staticmethod
    def _score(model: KMergeModel, prompts: list[tuple[int, ...]]) -> list[list[float]]:
        tok = model.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        lm, was_training = model.lm, model.lm.training
        lm.eval()
        try:
            with model.peft_model.disable_adapter():
                return token_surprisal(lm, prompts, start)
        finally:
            lm.train(was_training)
