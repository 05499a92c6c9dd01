"""Blocks, compression, labels, positions and the input checks of batching."""

import pytest
import torch
from torch import nn

from kmerge.batching import (
    IGNORE_INDEX,
    block_spans,
    compress_batch,
    make_blocks,
    tokenize_answers,
    tokenize_prompts,
)
from kmerge.encoder import MergeEncoder
from kmerge.errors import KMergeDataError, KMergeError

P = 0  # pad id used by the hand-checked cases
IDS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]

LONG_PROMPT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by "
    "the door and the bird sings"
)


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------ make_blocks, by hand
@pytest.mark.parametrize(
    "k, align, blocks, mask",
    [
        (
            2,
            "start",
            [
                [[1, 2], [3, 4], [5, P]],
                [[6, 7], [P, P], [P, P]],
                [[8, 9], [10, 11], [P, P]],
            ],
            [
                [[1, 1], [1, 1], [1, 0]],
                [[1, 1], [0, 0], [0, 0]],
                [[1, 1], [1, 1], [0, 0]],
            ],
        ),
        (
            2,
            "end",
            [
                [[1, P], [2, 3], [4, 5]],
                [[6, 7], [P, P], [P, P]],
                [[8, 9], [10, 11], [P, P]],
            ],
            [
                [[1, 0], [1, 1], [1, 1]],
                [[1, 1], [0, 0], [0, 0]],
                [[1, 1], [1, 1], [0, 0]],
            ],
        ),
        (
            3,
            "start",
            [[[1, 2, 3], [4, 5, P]], [[6, 7, P], [P, P, P]], [[8, 9, 10], [11, P, P]]],
            [[[1, 1, 1], [1, 1, 0]], [[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [1, 0, 0]]],
        ),
        (
            3,
            "end",
            [[[1, 2, P], [3, 4, 5]], [[6, 7, P], [P, P, P]], [[8, P, P], [9, 10, 11]]],
            [[[1, 1, 0], [1, 1, 1]], [[1, 1, 0], [0, 0, 0]], [[1, 0, 0], [1, 1, 1]]],
        ),
        (
            8,
            "end",
            [[[1, 2, 3, 4, 5, P, P, P]], [[6, 7] + [P] * 6], [[8, 9, 10, 11] + [P] * 4]],
            [[[1, 1, 1, 1, 1, 0, 0, 0]], [[1, 1] + [0] * 6], [[1, 1, 1, 1] + [0] * 4]],
        ),
    ],
)
def test_make_blocks_by_hand(k, align, blocks, mask):
    """Exact ids and masks for ragged lengths: "start" leaves the last block partial, "end"
    the first; a partial block's real tokens fill its first slots; examples with fewer
    blocks get trailing empty blocks."""
    block_ids, block_mask, n_blocks = make_blocks(IDS, k, P, align)
    assert block_ids.tolist() == blocks
    assert block_mask.int().tolist() == mask
    assert block_mask.dtype == torch.bool
    assert n_blocks == [-(-len(ids) // k) for ids in IDS]


@pytest.mark.parametrize(
    "n, k, align, starts, spans",
    [
        (5, 2, "start", (), [(0, 2), (2, 4), (4, 5)]),
        (5, 2, "end", (), [(0, 1), (1, 3), (3, 5)]),
        (6, 3, "end", (), [(0, 3), (3, 6)]),
        (1, 4, "end", (), [(0, 1)]),
        (3, 1, "end", (), [(0, 1), (1, 2), (2, 3)]),
        # a flagged token starts a segment; each segment is cut from its end into <= K blocks
        (7, 3, "segments", [0, 0, 1, 0, 0, 0, 1], [(0, 2), (2, 3), (3, 6), (6, 7)]),
        (4, 4, "segments", [1, 0, 0, 0], [(0, 4)]),  # a flag on the first token changes nothing
        (4, 8, "segments", [0, 1, 1, 0], [(0, 1), (1, 2), (2, 4)]),
        (5, 2, "segments", [0] * 5, [(0, 1), (1, 3), (3, 5)]),  # no flags: same as "end"
    ],
)
def test_block_spans_by_hand(n, k, align, starts, spans):
    assert block_spans(n, k, align, [bool(s) for s in starts]) == spans


@pytest.mark.parametrize("align, starts", [("segments", None), ("middle", None)])
def test_make_blocks_bad_layout_is_a_kmerge_error(align, starts):
    """An unknown alignment, or "segments" without segment flags, is a clear kmerge error."""
    with pytest.raises(KMergeError, match=align):
        make_blocks([[1, 2, 3]], 2, P, align, starts)


def test_make_blocks_segments():
    """Segment flags per example cut blocks early; the mask marks the real tokens."""
    starts = [[False, False, True, False, False], [False, True]]
    block_ids, block_mask, n_blocks = make_blocks(
        [[1, 2, 3, 4, 5], [6, 7]], 3, P, "segments", starts
    )
    assert n_blocks == [2, 2]
    assert block_ids.tolist() == [[[1, 2, P], [3, 4, 5]], [[6, P, P], [7, P, P]]]
    assert block_mask.int().tolist() == [[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 0, 0]]]


def test_make_blocks_k1_and_exact_multiples():
    """K = 1 is one token per block; lengths that are multiples of K have no partial block."""
    block_ids, block_mask, n_blocks = make_blocks(IDS, 1, P)
    assert n_blocks == [5, 2, 4]
    assert block_ids[:, :, 0].tolist() == [[1, 2, 3, 4, 5], [6, 7, P, P, P], [8, 9, 10, 11, P]]
    for align in ("start", "end"):
        block_ids, block_mask, n_blocks = make_blocks([[1, 2, 3, 4], [5, 6, 7, 8]], 4, P, align)
        assert n_blocks == [1, 1]
        assert block_mask.all()
        assert block_ids.tolist() == [[[1, 2, 3, 4]], [[5, 6, 7, 8]]]


@pytest.mark.parametrize("align", ["start", "end", "segments"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_make_blocks_keeps_every_token_once_in_order(k, align):
    """Reading the real slots back in order gives each prompt exactly, for any K and layout;
    every block is non-empty and at most K long."""
    g = torch.Generator().manual_seed(k)
    ids = [torch.randint(1, 100, (n,), generator=g).tolist() for n in (1, 7, 8, 13, 3)]
    starts = [(torch.rand(len(row), generator=g) < 0.3).tolist() for row in ids]
    block_ids, block_mask, n_blocks = make_blocks(ids, k, P, align, starts)
    if align != "segments":
        assert n_blocks == [-(-len(row) // k) for row in ids]
    assert block_ids.shape == (5, max(n_blocks), k)
    for i, row in enumerate(ids):
        assert block_ids[i][block_mask[i]].tolist() == row
        assert block_mask[i, : n_blocks[i]].any(dim=-1).all()
        assert not block_mask[i, n_blocks[i] :].any()


# ------------------------------------------------------------------ compress_batch, by hand
def embedding(vocab=32, hidden=4, seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(vocab, hidden)


def test_compress_batch_layout_k1():
    """K = 1: [left padding][prompt embeddings][answer embeddings], masks, positions, labels."""
    embed = embedding()
    prompts, answers = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    batch = compress_batch(embed, MergeEncoder(4, 1), prompts, answers, pad_id=P)
    # lengths 5 and 4 -> T = 5, example 1 has one padding position
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    n = IGNORE_INDEX
    assert batch.labels.tolist() == [[n, n, n, 5, 6], [n, n, 7, 8, 9]]
    with torch.no_grad():
        expected0 = embed(torch.tensor([1, 2, 3, 5, 6]))
        expected1 = embed(torch.tensor([4, 7, 8, 9]))
        assert torch.equal(batch.inputs_embeds[0], expected0)
        assert torch.equal(batch.inputs_embeds[1, 1:], expected1)
        assert torch.equal(batch.inputs_embeds[1, 0], torch.zeros(4))
    assert batch.prompt_tokens == [3, 1]
    assert batch.positions_fed == [3, 1]


@pytest.mark.parametrize("align", ["start", "end"])
def test_compress_batch_merges_blocks_k2(align):
    """K = 2: each prompt position is the mean of its block's real token embeddings."""
    embed = embedding()
    prompts, answers = [[1, 2, 3, 4, 5], [6, 7]], [[8], [9, 10]]
    batch = compress_batch(embed, MergeEncoder(4, 2), prompts, answers, pad_id=P, align=align)
    assert batch.positions_fed == [3, 1]
    assert batch.prompt_tokens == [5, 2]
    assert batch.attention_mask.sum(dim=1).tolist() == [3 + 1, 1 + 2]
    groups = [[1, 2], [3, 4], [5]] if align == "start" else [[1], [2, 3], [4, 5]]
    with torch.no_grad():
        expected = torch.stack([embed(torch.tensor(g)).mean(0) for g in groups])
        expected = torch.cat([expected, embed(torch.tensor([8]))])
        torch.testing.assert_close(batch.inputs_embeds[0], expected)
        expected1 = torch.cat(
            [embed(torch.tensor([6, 7])).mean(0, keepdim=True), embed(torch.tensor([9, 10]))]
        )
        torch.testing.assert_close(batch.inputs_embeds[1, 1:], expected1)


def test_compress_batch_prefix_tokens():
    """prefix_ids (e.g. BOS) go unmerged before every prompt and count as positions fed."""
    embed = embedding()
    prompts, answers = [[1, 2, 3, 4], [5]], [[6], [7, 8]]
    batch = compress_batch(embed, MergeEncoder(4, 2), prompts, answers, pad_id=P, prefix_ids=[9])
    assert batch.positions_fed == [1 + 2, 1 + 1]
    assert batch.prompt_tokens == [4, 1]
    n = IGNORE_INDEX
    assert batch.labels.tolist() == [[n, n, n, 6], [n, n, 7, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    with torch.no_grad():
        e = embed.weight
        expected0 = torch.stack([e[9], (e[1] + e[2]) / 2, (e[3] + e[4]) / 2, e[6]])
        expected1 = torch.stack([e[9], e[5], e[7], e[8]])
    torch.testing.assert_close(batch.inputs_embeds[0], expected0)
    torch.testing.assert_close(batch.inputs_embeds[1], expected1)


@pytest.mark.parametrize("prefix", [(), (9,)])
def test_compress_batch_block_ends_and_prompt_columns(prefix):
    """Each fed prompt position knows the last prompt token it covers, and prompt_columns
    finds it in the left-padded sequence, prefix skipped (what prompt distillation aligns)."""
    embed = embedding()
    prompts, answers = [[1, 2, 3, 4, 5], [6, 7]], [[8], [9, 10]]
    protected = [[False, False, True, False, False], [False, False]]
    batch = compress_batch(
        embed, MergeEncoder(4, 2), prompts, answers, pad_id=P, prefix_ids=prefix,
        protected=protected,
    )  # fmt: skip
    # example 0: blocks [1, 2], raw 3, [4, 5]; example 1: one block [6, 7]
    assert batch.block_ends == [[1, 2, 4], [1]]
    rows, cols = batch.prompt_columns([[0, 1, 2], [0]])
    with torch.no_grad():
        e = embed.weight
        expected = torch.stack([(e[1] + e[2]) / 2, e[3], (e[4] + e[5]) / 2, (e[6] + e[7]) / 2])
    torch.testing.assert_close(batch.inputs_embeds[rows, cols], expected)
    assert rows.tolist() == [0, 0, 0, 1]
    # example 1 is 1 + 2 long against 3 + 1: one padding column (and the prefix) before it
    assert cols.tolist()[-1] == 1 + len(prefix)


def test_compress_batch_without_answers():
    """Prompts only (generation): no labels, and the sequence is just the blocks."""
    batch = compress_batch(embedding(), MergeEncoder(4, 4), [[1] * 9, [2] * 3], pad_id=P)
    assert batch.labels is None
    assert batch.inputs_embeds.shape == (2, 3, 4)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_compress_batch_answer_count_mismatch():
    with pytest.raises(KMergeDataError, match="2 prompts but 1 answers"):
        compress_batch(embedding(), MergeEncoder(4, 2), [[1], [2]], [[3]], pad_id=P)


def test_compress_batch_max_positions_and_reserve():
    """A sequence must fit the context together with the reserve; the limit is inclusive."""
    encoder, embed = MergeEncoder(4, 2), embedding()
    prompts, answers = [[1] * 6], [[2, 3]]  # 3 blocks + 2 answer tokens = 5 positions
    compress_batch(embed, encoder, prompts, answers, pad_id=P, max_positions=5)
    compress_batch(embed, encoder, prompts, answers, pad_id=P, max_positions=8, reserve=3)
    with pytest.raises(KMergeDataError, match=r"example 0 needs 5 positions .* context is 4"):
        compress_batch(embed, encoder, prompts, answers, pad_id=P, max_positions=4)
    with pytest.raises(KMergeDataError, match=r"needs 9 positions .* \+ 4 to generate.* is 8"):
        compress_batch(embed, encoder, prompts, answers, pad_id=P, max_positions=8, reserve=4)


# ------------------------------------------------------------------ through the tokenizer
@pytest.mark.parametrize("k", [1, 3, 4])
def test_prepare_labels_positions_and_counts(tiny_model, tokenizer, k):
    """Labels are IGNORE_INDEX everywhere except exactly the tokenised answer + EOS at the end
    of each row; the attention mask counts blocks + answer tokens; positions count from 0 over
    real positions with padding on the left."""
    model = tiny_model(k)
    prompts = ["Hi", LONG_PROMPT, "one two three four five six seven"]
    answers = ["yes", "a longer answer here", "blue"]
    batch = model.prepare(prompts, answers)

    prompt_lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    answer_ids = [
        tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for a in answers
    ]
    n_blocks = [-(-n // k) for n in prompt_lens]
    assert batch.prompt_tokens == prompt_lens
    assert batch.positions_fed == n_blocks

    seq_len = batch.inputs_embeds.shape[1]
    assert seq_len == max(n + len(a) for n, a in zip(n_blocks, answer_ids))
    for i, (n, answer) in enumerate(zip(n_blocks, answer_ids)):
        length = n + len(answer)
        pad = seq_len - length
        assert batch.attention_mask[i].tolist() == [0] * pad + [1] * length
        assert batch.position_ids[i].tolist() == [0] * pad + list(range(length))
        labels = batch.labels[i].tolist()
        assert labels[seq_len - len(answer) :] == answer
        assert labels[: seq_len - len(answer)] == [IGNORE_INDEX] * (seq_len - len(answer))
        assert answer[-1] == tokenizer.eos_token_id
        padding = batch.inputs_embeds[i, :pad]
        assert torch.equal(padding, torch.zeros_like(padding))


def test_prepare_segments(tiny_model, tokenizer):
    """block_alignment="segments": a token starting with "," or a newline opens a new block."""
    model = tiny_model(4, block_alignment="segments")
    prompt = "name: Bob, age: 42, city: Paris\nnext line here, ok"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    assert pieces == [
        "name",
        ":",
        " Bob",
        ",",
        " age",
        ":",
        " ",
        "4",
        "2",
        ",",
        " city",
        ":",
        " Paris",
        "\n",
        "next",
        " line",
        " here",
        ",",
        " ok",
    ]
    # blocks: name:Bob | ,age:_ | 42 | ,city:Paris | \nnext line here | ,ok
    batch = model.prepare([prompt, "no separators at all here"])
    assert batch.positions_fed[0] == 6
    plain = tiny_model(4).prepare([prompt, "no separators at all here"])
    assert plain.positions_fed == [5, batch.positions_fed[1]]


def test_prepare_prepend_bos(tiny_model, tokenizer):
    """prepend_bos puts one unmerged BOS embedding in front of the merged prompt."""
    model = tiny_model(4, prepend_bos=True)
    prompt = "one two three four five"
    batch = model.prepare([prompt], ["yes"])
    n_blocks = -(-n_tokens(tokenizer, prompt) // 4)
    assert batch.positions_fed == [1 + n_blocks]
    bos = model.lm.get_input_embeddings().weight[tokenizer.bos_token_id]
    assert torch.equal(batch.inputs_embeds[0, 0], bos)
    plain = tiny_model(4).prepare([prompt], ["yes"])
    assert torch.equal(batch.inputs_embeds[0, 1:], plain.inputs_embeds[0])


def test_prepare_without_eos(tiny_model, tokenizer):
    """append_eos=False: the labels are the answer tokens alone."""
    model = tiny_model(2, append_eos=False, answer_separator="")
    batch = model.prepare(["What is 2+2?"], ["4"])
    expected = tokenizer("4", add_special_tokens=False)["input_ids"]
    assert batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist() == expected


def test_tokenize_prompts_and_answers(tokenizer):
    assert tokenize_prompts(tokenizer, ["Hi", "abcd efgh"]) == [
        tokenizer("Hi", add_special_tokens=False)["input_ids"],
        tokenizer("abcd efgh", add_special_tokens=False)["input_ids"],
    ]
    eos = tokenizer.eos_token_id
    assert tokenize_answers(tokenizer, ["4"]) == [
        tokenizer(" 4", add_special_tokens=False)["input_ids"] + [eos]
    ]
    assert tokenize_answers(tokenizer, ["4"], separator="=", append_eos=False) == [
        tokenizer("=4", add_special_tokens=False)["input_ids"]
    ]


# ------------------------------------------------------------------ bad data
@pytest.mark.parametrize(
    "prompts, message",
    [
        (["ok", ""], "prompt 1 is empty"),
        (["ok", "fine", "   \n"], "prompt 2 is empty"),
        ([None], "prompt 0 is empty"),
        (["ok", 3], "prompt 1 is empty"),
        ("a single string", "prompts must be a list of strings, got a single string"),
        ([], "no prompts given"),
    ],
)
def test_bad_prompts(tiny_model, tokenizer, prompts, message):
    """Empty / whitespace / non-string prompts are refused by index, before any model work."""
    with pytest.raises(KMergeDataError, match=message):
        tokenize_prompts(tokenizer, prompts)
    with pytest.raises(KMergeDataError, match=message):
        tiny_model(2).prepare(prompts)


@pytest.mark.parametrize("answers, index", [(["", "x"], 0), (["x", "  "], 1), (["x", None], 1)])
def test_bad_answers(tiny_model, answers, index):
    with pytest.raises(KMergeDataError, match=f"answer {index} is empty"):
        tiny_model(2).prepare(["a", "b"], answers)


def test_single_answer_string_rejected(tiny_model, tokenizer):
    """Like prompts, a bare string of answers must be refused, not iterated char by char
    (here it even has as many characters as there are prompts)."""
    message = "answers must be a list of strings, got a single string"
    with pytest.raises(KMergeDataError, match=message):
        tokenize_answers(tokenizer, "abc")
    with pytest.raises(KMergeDataError, match=message):
        tiny_model(2).prepare(["a", "b", "c"], "xyz")


# ------------------------------------------------------------------ context limit
def test_long_prompt_needs_merging(tiny_model, tokenizer):
    """With a 16-position context a 25-token prompt does not fit at K = 1 (the error gives the
    positions needed and the limit) but fits at K = 4; the generation reserve counts too."""
    n_prompt = len(tokenizer(LONG_PROMPT, add_special_tokens=False)["input_ids"])
    n_answer = len(tokenizer(" yes", add_special_tokens=False)["input_ids"]) + 1
    assert n_prompt + n_answer > 16

    small = {"max_position_embeddings": 16}
    k1 = tiny_model(1, base_overrides=small)
    needed = n_prompt + n_answer
    with pytest.raises(KMergeDataError, match=rf"example 0 needs {needed} positions.*is 16"):
        k1.prepare([LONG_PROMPT], ["yes"])
    with pytest.raises(KMergeDataError, match=rf"needs {n_prompt + 1} positions.*context is 16"):
        k1.generate([LONG_PROMPT], max_new_tokens=1)

    k4 = tiny_model(4, base_overrides=small)
    n_blocks = -(-n_prompt // 4)
    batch = k4.prepare(["Hi", LONG_PROMPT], ["no", "yes"])
    assert batch.positions_fed[1] == n_blocks
    assert batch.attention_mask[1].sum() == n_blocks + n_answer
    # the reserve for generated tokens: exactly filling the context is fine, one more is not
    k4.prepare([LONG_PROMPT], reserve=16 - n_blocks)
    with pytest.raises(KMergeDataError, match=rf"needs 17 positions.*\+ {17 - n_blocks} to gen"):
        k4.prepare([LONG_PROMPT], reserve=17 - n_blocks)
    with pytest.raises(KMergeDataError, match="needs 17 positions"):
        k4.generate([LONG_PROMPT], max_new_tokens=17 - n_blocks)
    (row,) = k4.generate_ids([LONG_PROMPT], max_new_tokens=16 - n_blocks)
    assert len(row) <= 16 - n_blocks
