"""One step at a time KV-cached decoding of a merged batch, where rows may leave early.

``KMergeModel.generate`` hands the whole loop to transformers; a server needs the steps: to
stream each token, to apply every request's own sampling settings, and to drop a row that
finished (EOS, stop string, its max_tokens, a client gone) so the next steps only compute
the rows still running. The batch itself comes from ``KMergeModel.prepare`` (left-padded,
positions counted over real positions only), so each row sees what it would see alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from kmerge.batching import CompressedBatch
from kmerge.serving.protocol import Sampling


class DecodeBatch:
    """Prefill ``batch`` on ``model.lm`` and decode it one token per :meth:`step`."""

    def __init__(self, model, batch: CompressedBatch, samplings: Sequence[Sampling]) -> None:
        self.lm = model.lm
        self.samplings = list(samplings)
        self.rows = list(range(len(self.samplings)))  # original row of each live row
        device = batch.inputs_embeds.device
        self.generators = [_generator(s.seed, device) for s in self.samplings]
        self.mask = batch.attention_mask
        self.positions = batch.position_ids[:, -1:]  # the last real position of each row
        self.cache = DynamicCache()
        # transformers renamed the cache argument (``past_key_values`` -> ``cache``, the old
        # name deprecated from 5.2x on); pass whichever this model's forward takes.
        params = inspect.signature(self.lm.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        with torch.inference_mode():
            out = self.lm(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=self.mask,
                position_ids=batch.position_ids,
                **{self.cache_arg: self.cache},
                use_cache=True,
                logits_to_keep=1,  # only the next-token logits: [B, 1, V], not [B, T, V]
            )
        self.next_tokens = self._choose(out.logits[:, -1])

    def keep(self, live: Sequence[int]) -> None:
        """Keep only these original rows (in order) for the next steps."""
        if list(live) == self.rows:
            return
        index = [self.rows.index(r) for r in live]
        select = torch.tensor(index, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(select)
        self.mask = self.mask[select]
        self.positions = self.positions[select]
        self.next_tokens = self.next_tokens[select]
        self.rows = list(live)

    def tokens(self) -> dict[int, int]:
        """The token just chosen for each live original row."""
        return dict(zip(self.rows, self.next_tokens.tolist()))

    def step(self) -> None:
        """Feed the chosen tokens and choose the next ones."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions + 1
        with torch.inference_mode():
            out = self.lm(
                input_ids=self.next_tokens[:, None],
                attention_mask=self.mask,
                position_ids=self.positions,
                **{self.cache_arg: self.cache},
                use_cache=True,
            )
        self.next_tokens = self._choose(out.logits[:, -1])

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy rows take the argmax (as generate does); the others sample their own way."""
        chosen = logits.argmax(dim=-1)
        for i, row in enumerate(self.rows):
            s = self.samplings[row]
            if s.temperature > 0:
                chosen[i] = sample(logits[i], s.temperature, s.top_p, self.generators[row])
        return chosen


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token from softmax(logits / temperature), restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh random seed, as OpenAI does without one
    else:
        generator.manual_seed(seed)
    return generator
