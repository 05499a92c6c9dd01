"""Lossless meta-token compression (after Harvill et al. 2025, arXiv 2506.00307).

Repeated token subsequences are replaced by meta-tokens, and a dictionary defining each
meta-token is put before the prompt:

    [m1 s1... m2 s2... END] [prompt with every chosen occurrence of s1 -> m1, s2 -> m2]

Greedy, as in LZ-style dictionary coding: at each round, among the subsequences of 2 to
``max_length`` tokens of the current sequence, pick the one whose replacement saves the most
positions *counting its dictionary entry* (non-overlapping occurrences ``c`` of a length-``L``
subsequence save ``c * (L - 1)`` positions and cost ``L + 1``, plus 1 for ``END`` with the first
entry); stop when nothing saves a position or the meta-tokens run out. Later entries may
contain earlier meta-tokens. :func:`meta_decode` inverts it exactly, and a prompt with no
profitable repeat is left as it is. The ratio is whatever the input allows (reported as
measured).

Meta-token ids: the tokenizer's own reserved special tokens (added tokens that are not BOS,
EOS, PAD or UNK; 15 in SmolLM2), the first as ``END``. kmerge never trains the embedding table,
so these keep their pretrained embeddings and the LoRA-tuned model learns to read them from
the dictionary in context. A meta-token has no fixed meaning anyway: ``m1`` stands for a
different subsequence in every prompt. A prompt that already contains one of these ids cannot
be encoded losslessly and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.methods.base import PromptCompressor, register_method

if TYPE_CHECKING:
    from kmerge.modeling import KMergeModel


def reserved_token_ids(tokenizer) -> list[int]:
    """The tokenizer's special added tokens that are not BOS, EOS, PAD or UNK, by id."""
    named = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    named.add(tokenizer.unk_token_id)
    return sorted(
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i not in named
    )


def meta_encode(
    ids: Sequence[int], meta_ids: Sequence[int], end_id: int, max_length: int = 8
) -> list[int]:
    """Compress ``ids`` with the meta-tokens ``meta_ids`` (used in order) and ``end_id``."""
    reserved = {*meta_ids, end_id}
    if reserved.intersection(ids):
        raise KMergeDataError(
            f"the prompt contains reserved meta-token ids {sorted(reserved.intersection(ids))}; "
            "it cannot be compressed losslessly"
        )
    body, entries = list(ids), []
    for meta in meta_ids:
        gain, gram = _best_repeat(body, max_length, extra_cost=0 if entries else 1)
        if gain <= 0:
            break
        body = _replace(body, gram, meta)
        entries += [meta, *gram]
    return [*entries, end_id, *body] if entries else body


def meta_decode(ids: Sequence[int], meta_ids: Sequence[int], end_id: int) -> list[int]:
    """Invert :func:`meta_encode`."""
    if end_id not in ids:
        return list(ids)
    cut = list(ids).index(end_id)
    table: dict[int, list[int]] = {}
    current: list[int] = []
    for token in ids[:cut]:
        if len(table) < len(meta_ids) and token == meta_ids[len(table)]:
            current = table[token] = []  # the next unused meta-token opens its definition
        else:
            current.extend(table.get(token, [token]))  # earlier meta-tokens are already expanded
    return [t for token in ids[cut + 1 :] for t in table.get(token, [token])]


def _best_repeat(body: list[int], max_length: int, extra_cost: int) -> tuple[int, tuple]:
    """The subsequence whose replacement saves the most positions, and that saving.
    Ties go to the longer, then the earlier subsequence."""
    best: tuple[int, int, int] = (0, 0, 0)  # (gain, length, -first position)
    best_gram: tuple = ()
    for length in range(2, max_length + 1):
        seen: dict[tuple, list[int]] = {}  # gram -> [count, end of last counted, first]
        for i in range(len(body) - length + 1):
            gram = tuple(body[i : i + length])
            entry = seen.setdefault(gram, [0, 0, i])
            if i >= entry[1]:  # non-overlapping occurrences, counted left to right
                entry[0], entry[1] = entry[0] + 1, i + length
        for gram, (count, _, first) in seen.items():
            key = (count * (length - 1) - (length + 1) - extra_cost, length, -first)
            if key > best:
                best, best_gram = key, gram
    return best[0], best_gram


def _replace(body: list[int], gram: tuple, meta: int) -> list[int]:
    out, i, n = [], 0, len(gram)
    while i < len(body):
        if tuple(body[i : i + n]) == gram:
            out.append(meta)
            i += n
        else:
            out.append(body[i])
            i += 1
    return out


@register_method("meta_tokens")
class MetaTokens(PromptCompressor):
    """Lossless meta-token compression with the tokenizer's reserved special tokens."""

    takes_ratio = False
    exact_ratio = False
    max_length = 8  # longest subsequence a meta-token stands for

    def compress(
        self, prompt_ids: Sequence[Sequence[int]], model: KMergeModel | None = None
    ) -> list[list[int]]:
        if model is None:
            raise KMergeConfigError(
                "meta_tokens takes its meta-token ids from the model's tokenizer"
            )
        reserved = reserved_token_ids(model.tokenizer)
        if len(reserved) < 2:
            raise KMergeConfigError(
                "meta_tokens needs at least 2 reserved special tokens in the tokenizer, "
                f"found {len(reserved)}"
            )
        end, metas = reserved[0], tuple(reserved[1:])
        return [list(_encode_cached(tuple(ids), metas, end, self.max_length)) for ids in prompt_ids]


@lru_cache(maxsize=65536)  # training sees every prompt once per epoch
def _encode_cached(ids: tuple, metas: tuple, end: int, max_length: int) -> tuple:
    return tuple(meta_encode(ids, metas, end, max_length))
