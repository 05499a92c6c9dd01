"""Batching and compression: prompts (and answers) -> what the base model is fed.

One function, :func:`compress_batch`, does it all. For each example the sequence is

    [pad ... pad] [merged prompt blocks (ceil(L/K))] [answer tokens + EOS]

left-padded so that batched generation appends new tokens right after every prompt. Padding
tokens never enter a block: the partial block of a prompt merges only its real tokens, blocks
past a prompt's end are dropped, padding positions are masked, and position ids count only
real positions (0, 1, 2, ...), so each example sees exactly what it would see alone.

Protected tokens (``protected`` flags per prompt token) are never merged: each one is fed as
its own, ordinary token embedding, and the unprotected runs between them are cut into blocks
on their own, so a block never straddles a protected token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kmerge.encoder import MergeEncoder
from kmerge.errors import KMergeDataError

IGNORE_INDEX = -100
BlockAlignment = Literal["start", "end", "segments"]


@dataclass
class CompressedBatch:
    """Tensors for the base model plus the measured compression of each example."""

    inputs_embeds: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T], 1 = real position
    position_ids: torch.Tensor  # [B, T], contiguous over real positions, 0 on padding
    labels: torch.Tensor | None  # [B, T], answer token ids, IGNORE_INDEX elsewhere
    prompt_tokens: list[int]  # tokens in each prompt before merging
    positions_fed: list[int]  # prompt positions actually fed (blocks + raw + prefix tokens)
    raw_positions: list[int] | None = None  # of those, protected tokens fed unmerged
    # Where each example's prompt positions are: the column of its first one (after any
    # prefix), and for each fed prompt position the index of the last prompt token it covers.
    prompt_starts: list[int] | None = None
    block_ends: list[list[int]] | None = None

    def prompt_columns(
        self, positions: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) in the fed sequence of the given prompt positions of each example
        (0 = its first prompt position after any prefix), for indexing ``[B, T, ...]`` tensors."""
        rows = [i for i, row in enumerate(positions) for _ in row]
        cols = [self.prompt_starts[i] + j for i, row in enumerate(positions) for j in row]
        device = self.inputs_embeds.device
        return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(
            cols, dtype=torch.long, device=device
        )


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Tokenise prompts without special tokens; reject empty prompts by index."""
    if isinstance(prompts, str):
        raise KMergeDataError("prompts must be a list of strings, got a single string")
    ids: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise KMergeDataError(f"prompt {i} is empty (got {prompt!r}); every prompt needs text")
        ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise KMergeDataError("no prompts given")
    return ids


def tokenize_answers(
    tokenizer, answers: Sequence[str], separator: str = " ", append_eos: bool = True
) -> list[list[int]]:
    """Tokenise answers separately from their prompts (so block boundaries never depend on the
    answer), each preceded by ``separator`` and followed by EOS when ``append_eos``."""
    if isinstance(answers, str):
        raise KMergeDataError("answers must be a list of strings, got a single string")
    out: list[list[int]] = []
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise KMergeDataError(f"answer {i} is empty (got {answer!r}); every example needs one")
        ids = tokenizer(separator + answer, add_special_tokens=False)["input_ids"]
        if append_eos:
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids)
    return out


def block_spans(
    n_tokens: int, k: int, align: BlockAlignment = "start", segment_starts: Sequence[bool] = ()
) -> list[tuple[int, int]]:
    """Cut ``n_tokens`` contiguous tokens into blocks of at most ``k``, as (start, end) spans.

    ``"start"``: the paper's layout, blocks from the first token (the last one may be partial).
    ``"end"``: blocks end at the last token (the first may be partial), so the end of the
    prompt, nearest to the answer, is always cut the same way.
    ``"segments"``: a block never straddles two segments (a segment starts at every token
    flagged in ``segment_starts``, e.g. a newline or comma), and each segment is cut from its
    end, so the value that ends a field ("Parent: PX") stays whole; compression drops a little.
    """
    if align == "start":
        return [(s, min(s + k, n_tokens)) for s in range(0, n_tokens, k)]
    if align not in ("end", "segments"):
        raise KMergeDataError(
            f"block alignment must be 'start', 'end' or 'segments', got {align!r}"
        )
    if align == "end":
        return _spans_from_end(0, n_tokens, k)
    if len(segment_starts) != n_tokens:
        raise KMergeDataError(
            f"'segments' alignment needs one segment flag per token: {n_tokens} tokens, "
            f"{len(segment_starts)} flags"
        )
    cuts = [t for t in range(1, n_tokens) if segment_starts[t]]
    spans: list[tuple[int, int]] = []
    for begin, end in zip([0, *cuts], [*cuts, n_tokens]):
        spans += _spans_from_end(begin, end, k)
    return spans


def _spans_from_end(begin: int, end: int, k: int) -> list[tuple[int, int]]:
    """Blocks of ``k`` covering [begin, end), the partial one first."""
    first = begin + ((end - begin) % k or k)
    return [(begin, first)] + [(s, s + k) for s in range(first, end, k)]


def prompt_layout(
    n_tokens: int,
    k: int,
    align: BlockAlignment = "start",
    segment_starts: Sequence[bool] = (),
    protected: Sequence[bool] = (),
) -> list[tuple[int, int, bool]]:
    """``(start, end, raw)`` spans covering ``n_tokens`` in order: every protected token is a
    raw span of its own; each run of unprotected tokens is cut by :func:`block_spans`."""
    if protected and len(protected) != n_tokens:
        raise KMergeDataError(
            f"protected flags: {len(protected)} flags for a prompt of {n_tokens} tokens"
        )
    if not any(protected):
        return [(a, b, False) for a, b in block_spans(n_tokens, k, align, segment_starts)]
    out: list[tuple[int, int, bool]] = []
    t = 0
    while t < n_tokens:
        if protected[t]:
            out.append((t, t + 1, True))
            t += 1
            continue
        end = t
        while end < n_tokens and not protected[end]:
            end += 1
        starts = list(segment_starts[t:end]) if segment_starts else ()
        out += [(t + a, t + b, False) for a, b in block_spans(end - t, k, align, starts)]
        t = end
    return out


def make_blocks(
    token_ids: Sequence[Sequence[int]],
    k: int,
    pad_id: int,
    align: BlockAlignment = "start",
    segment_starts: Sequence[Sequence[bool]] | None = None,
    protected: Sequence[Sequence[bool]] | None = None,
    width: int | None = None,
    return_raw: bool = False,
):
    """Lay each id list out as blocks (see :func:`prompt_layout`) in a ``[B, N, W]`` grid.

    Returns ``block_ids [B, N, W]``, ``block_mask [B, N, W]`` (True = real token; a partial
    block's real tokens come first) and the number of blocks of each example, plus with
    ``return_raw`` a ``[B, N]`` mask of the raw (protected) single-token blocks. Examples with
    fewer blocks are padded with empty blocks. ``width`` (default ``k``) is the grid's block
    width: an encoder built for K=4 merges blocks cut at K=2 as partial blocks.
    """
    width = width or k
    if k > width:
        raise KMergeDataError(f"blocks of K={k} do not fit an encoder built for K={width}")
    layouts = [
        prompt_layout(
            len(ids),
            k,
            align,
            segment_starts[i] if segment_starts else (),
            protected[i] if protected else (),
        )
        for i, ids in enumerate(token_ids)
    ]
    n_max = max(len(s) for s in layouts)
    block_ids = torch.full((len(token_ids), n_max * width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), n_max * width), dtype=torch.bool)
    raw = torch.zeros((len(token_ids), n_max), dtype=torch.bool)
    for i, (ids, spans) in enumerate(zip(token_ids, layouts)):
        # The spans cut [0, len(ids)) in order, so token t lands in the t-th slot listed here;
        # one scatter per example instead of one tensor copy per block.
        slots = [j * width + s for j, (a, b, _) in enumerate(spans) for s in range(b - a)]
        slots = torch.tensor(slots, dtype=torch.long)
        block_ids[i, slots] = torch.tensor(list(ids), dtype=torch.long)
        mask[i, slots] = True
        raw[i, : len(spans)] = torch.tensor([r for _, _, r in spans], dtype=torch.bool)
    shape = (len(token_ids), n_max, width)
    out = block_ids.view(shape), mask.view(shape), [len(s) for s in layouts]
    return (*out, raw) if return_raw else out


def compress_batch(
    embed: nn.Embedding,
    encoder: MergeEncoder,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]] | None = None,
    *,
    pad_id: int,
    align: BlockAlignment = "start",
    max_positions: int | None = None,
    reserve: int = 0,
    prefix_ids: Sequence[int] = (),
    segment_starts: Sequence[Sequence[bool]] | None = None,
    prompt_tokens: Sequence[int] | None = None,
    protected: Sequence[Sequence[bool]] | None = None,
    k: int | None = None,
    spread_positions: bool = False,
) -> CompressedBatch:
    """Merge each prompt's K-blocks and append the answers as ordinary token embeddings.

    Args:
        embed: the base model's input embedding (ids -> vectors).
        encoder: the merge encoder; its ``k`` sets the block size.
        prompt_ids / answer_ids: token ids per example (answers optional, for training/scoring).
        pad_id: any valid token id; padded slots are masked and never reach the model.
        max_positions: the model's context; a sequence that would not fit (plus ``reserve``
            positions for generated tokens) is an error, never silently truncated.
        prefix_ids: ordinary (unmerged) tokens put before every prompt, e.g. BOS as an
            attention sink; they count as positions fed.
        prompt_tokens: each prompt's length before a token-level compressor shortened
            ``prompt_ids`` (default: their lengths); measured compression is relative to it.
        protected: one flag per prompt token; flagged tokens are fed unmerged (their own
            embedding, exactly) and blocks never straddle them.
        k: the block size to cut at, at most ``encoder.k`` (default ``encoder.k``); K=1 feeds
            every token unmerged, exactly the uncompressed prompt.
        spread_positions: a merged position takes the position id of its block's last token
            (arXiv 2409.14364), so the answer sits where it would after the plain prompt and
            relative distances match it; the context limit is then the uncompressed length.
            Default: contiguous ids 0..n-1.
    """
    k = encoder.k if k is None else k
    if k == 1:  # uncompressed: every token is its own raw position, whatever the encoder
        protected = [[True] * len(ids) for ids in prompt_ids]
    answer_ids = answer_ids or [[] for _ in prompt_ids]
    if len(answer_ids) != len(prompt_ids):
        raise KMergeDataError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers")
    block_ids, block_mask, n_blocks, raw = make_blocks(
        prompt_ids, k, pad_id, align, segment_starts, protected, encoder.k, return_raw=True
    )
    raw_positions = raw.sum(dim=1).tolist()
    n_blocks = [n + len(prefix_ids) for n in n_blocks]
    lengths = [n + len(a) for n, a in zip(n_blocks, answer_ids)]
    # The position ids each sequence uses: as many as positions fed, or with spreading as many
    # as the plain prompt's tokens (+ prefix and answer).
    spans = lengths
    if spread_positions:
        spans = [len(prefix_ids) + len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    # Check the context before any model work: nothing is ever truncated silently.
    if max_positions is not None:
        for i, (length, prompt) in enumerate(zip(spans, prompt_ids)):
            if length + reserve > max_positions:
                err = KMergeDataError(
                    f"example {i} needs {length + reserve} positions ({len(prompt)} prompt "
                    f"tokens -> {n_blocks[i]} prompt positions at K={k}, + "
                    f"{length - n_blocks[i]} answer tokens + {reserve} to generate) but the "
                    f"model's context is {max_positions}"
                )
                err.index = i  # which prompt of the batch (tasks.base.name_example)
                raise err

    device = embed.weight.device
    block_embeds = embed(block_ids.to(device))  # [B, N, W, H]
    if raw.all():
        merged = block_embeds[:, :, 0]
    else:
        merged = encoder(block_embeds, block_mask.to(device))  # [B, N, H]
        if raw.any():  # protected tokens: their own embedding, exactly
            merged = torch.where(raw.to(device).unsqueeze(-1), block_embeds[:, :, 0], merged)
    if prefix_ids:
        prefix = embed(torch.as_tensor(list(prefix_ids), dtype=torch.long, device=device))
        merged = torch.cat([prefix.unsqueeze(0).expand(len(n_blocks), -1, -1), merged], dim=1)
    seq_len = max(lengths)
    batch, hidden = len(prompt_ids), merged.shape[-1]
    inputs_embeds = merged.new_zeros(batch, seq_len, hidden)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    position_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long, device=device)

    flat_answers = [t for a in answer_ids for t in a]
    answer_embeds = (
        embed(torch.as_tensor(flat_answers, dtype=torch.long, device=device))
        if flat_answers
        else None
    )
    # The last prompt token each block covers: block sizes summed.
    block_ends = block_mask.sum(dim=-1).cumsum(dim=-1).sub(1)
    n_prefix = len(prefix_ids)
    if spread_positions:  # a block's position id is its last token's index
        spread_ids = block_ends.to(device) + n_prefix
    offset = 0
    for i, (n, answer) in enumerate(zip(n_blocks, answer_ids)):
        start = seq_len - lengths[i]  # left padding
        rows = [merged[i, :n]]
        if answer:
            rows.append(answer_embeds[offset : offset + len(answer)])
            labels[i, start + n :] = torch.as_tensor(answer, dtype=torch.long, device=device)
            offset += len(answer)
        inputs_embeds[i, start:] = torch.cat(rows, dim=0)
        attention_mask[i, start:] = 1
        if spread_positions:
            ids = [torch.arange(n_prefix, device=device), spread_ids[i, : n - n_prefix]]
            ids.append(n_prefix + len(prompt_ids[i]) + torch.arange(len(answer), device=device))
            position_ids[i, start:] = torch.cat(ids)
        else:
            position_ids[i, start:] = torch.arange(lengths[i], device=device)
    return CompressedBatch(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels if any(answer_ids) else None,
        prompt_tokens=list(prompt_tokens or [len(p) for p in prompt_ids]),
        positions_fed=n_blocks,
        raw_positions=raw_positions,
        prompt_starts=[seq_len - length + n_prefix for length in lengths],
        block_ends=[ends[: n - n_prefix] for ends, n in zip(block_ends.tolist(), n_blocks)],
    )
