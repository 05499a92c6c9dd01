"""The compared code paths: kmerge's prefill, decoding and generation against the raw base model
and the naive loops, on synthetic prompts of an exact length; the models they run."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kmerge.batching import IGNORE_INDEX, CompressedBatch, tokenize_prompts
from kmerge.errors import KMergeConfigError
from kmerge.modeling import KMergeConfig, KMergeModel

WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which be "
    "this had not but have they one their all been has more who can its time after first also "
    "new would about other into two only them when some over years there made city state"
).split()


def synthetic_prompt(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """A prompt of exactly ``n_tokens`` tokens: seeded random common words, each of which the
    tokenizer encodes as one token (checked), joined by spaces; if the joined text still
    tokenises differently (a tokenizer that merges across spaces), words are added or removed
    until the count is exact."""
    singles = [w for w in WORDS if len(token_ids(tokenizer, " " + w)) == 1]
    if not singles:
        raise KMergeConfigError("cannot build synthetic prompts: no single-token words found")
    rng = random.Random(seed)
    words = [rng.choice(singles) for _ in range(n_tokens)]
    for _ in range(8):
        text = "".join(" " + w for w in words)
        excess = len(token_ids(tokenizer, text)) - n_tokens
        if excess == 0:
            return text
        words = words[:-excess] if excess > 0 else words + words[:-excess]
    raise KMergeConfigError(f"cannot build a prompt of exactly {n_tokens} tokens")


def token_ids(tokenizer, text: str) -> list[int]:
    """The token ids of ``text`` as kmerge tokenises a prompt."""
    return tokenize_prompts(tokenizer, [text])[0]


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a KV cache (transformers ``Cache`` objects,
    or the legacy tuple of (key, value) pairs)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = list(cache)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


def first_token(lm, **inputs) -> tuple[torch.Tensor, object]:
    """One prefill forward: the greedy first token [B, 1] and the KV cache. Only the last
    position gets logits, as in ``generate``."""
    out = lm(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values


def kmerge_prefill(model: KMergeModel, prompts: Sequence[str]) -> tuple[torch.Tensor, object]:
    """kmerge end to end: tokenise, embed, merge, then the LoRA model's prefill."""
    batch = model.prepare(prompts)
    return first_token(model.lm, **_model_inputs(batch))


def raw_prefill(lm, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The raw base model (no LoRA, no encoder) fed token ids: the limit for this length."""
    return first_token(lm, input_ids=ids)


def _model_inputs(batch: CompressedBatch) -> dict:
    return dict(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )


def decode(model: KMergeModel, prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    """kmerge prefill, then ``n_tokens`` greedy steps on the KV cache (EOS not special)."""
    batch = model.prepare(prompts, reserve=n_tokens)
    token, cache = first_token(model.lm, **_model_inputs(batch))
    mask, position = batch.attention_mask, batch.position_ids[:, -1:]
    tokens = [token]
    for _ in range(n_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        out = model.lm(
            input_ids=tokens[-1],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1).tolist()


def rerun_generate(model: KMergeModel, prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    """Greedy generation without a KV cache: the whole sequence (merged prompt + tokens so far)
    is run again, all logits included, for every new token. EOS is suppressed, as
    ``min_new_tokens=n_tokens`` does in ``generate``, so both produce exactly n tokens."""
    batch = model.prepare(prompts, reserve=n_tokens)
    embeds, mask, positions = batch.inputs_embeds, batch.attention_mask, batch.position_ids
    embed, eos = model.lm.get_input_embeddings(), model.tokenizer.eos_token_id
    tokens = []
    for _ in range(n_tokens):
        logits = model.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits[:, -1]
        logits[:, eos] = -math.inf
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        embeds = torch.cat([embeds, embed(token)], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.cat(tokens, dim=1).tolist()


def cached_generate(model: KMergeModel, prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    """kmerge's own KV-cached generation, forced to produce exactly ``n_tokens``."""
    return model.generate_ids(prompts, n_tokens, min_new_tokens=n_tokens)


def full_logits_loss(model: KMergeModel, batch: CompressedBatch) -> torch.Tensor:
    """The reference training loss: logits on every position, then the answer tokens picked
    by ``ignore_index``. Equal to ``model.loss(batch).loss``, which applies the LM head only
    where labels are."""
    logits = model.lm(**_model_inputs(batch), use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch.labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
    )


def build_models(base, tokenizer, ks: Sequence[int]) -> dict[int, KMergeModel]:
    """One KMergeModel per K, all around ``base`` with one set of fresh LoRA adapters
    (``KMergeModel.from_base`` injects them into ``base`` in place): only the encoder depends
    on K, so the models share one copy of the language model's weights and differ only in
    their fresh encoders."""
    ks = sorted(set(ks))
    first = KMergeModel.from_base(base, KMergeConfig(k=ks[0]), tokenizer=tokenizer).eval()
    models = {ks[0]: first}
    for k in ks[1:]:
        config = dataclasses.replace(first.config, k=k)
        encoder = KMergeModel.make_encoder(first.lm, config).requires_grad_(True)
        models[k] = KMergeModel(first.peft_model, encoder, tokenizer, config).eval()
    return models
