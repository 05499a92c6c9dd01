"""The baselines of the Pareto sweep: exact target ratios on prompts of many lengths, seeded
randomness, self-information scores, lossless meta-tokens, the frozen mean-pool encoder, and
the compressor travelling with the model's config and checkpoint."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.evaluation import evaluate
from kmerge.methods import (
    METHODS,
    TokenSelector,
    check_compressor,
    get_compressor,
    get_method,
    kept_count,
    meta_decode,
    meta_encode,
    token_surprisal,
)
from kmerge.methods.meta_tokens import reserved_token_ids
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.tasks import Example
from kmerge.training import TrainConfig, make_optimizer
from tests.conftest import randomise_trainables

SELECTORS = sorted(n for n, c in METHODS.items() if issubclass(c, TokenSelector))
POSITIONAL = [n for n in SELECTORS if n != "self_information"]  # need no model
RATIOS = [1, 1.5, 2, 2.5, 3, 4, 8]
WORDS = "the cat sat on a mat and then it ran to see why my red hat was in a big box".split()


def prompt_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(n)]


def test_the_registry_has_every_method_of_the_issue():
    assert {
        "full", "kmerge", "mean_pool", "truncate_first", "truncate_last", "truncate_head_tail",
        "random_drop", "stride_drop", "self_information", "meta_tokens", "llmlingua2",
    } <= set(METHODS)  # fmt: skip


def test_kept_count_is_the_ceiling_rule_on_exact_fractions():
    assert [kept_count(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert kept_count(10, 2.5) == 4 and kept_count(11, 2.5) == 5
    assert kept_count(3, 1.5) == 2  # 3 / 1.5 is exactly 2, not 2.0000000001


@pytest.mark.parametrize("name", POSITIONAL)
@pytest.mark.parametrize("ratio", RATIOS)
def test_positional_baselines_meet_the_ratio_exactly_on_many_lengths(name, ratio):
    compressor = get_compressor(name, ratio, seed=3)
    prompts = [list(range(100, 100 + n)) for n in range(1, 70)]
    for ids, out in zip(prompts, compressor.compress(prompts)):
        assert len(out) == math.ceil(len(ids) / ratio), (len(ids), out)
        assert out == sorted(out) and set(out) <= set(ids)  # a subsequence, in order


def test_which_tokens_each_positional_baseline_keeps():
    ids = list(range(10))  # ratio 3 keeps ceil(10 / 3) = 4
    kept = {name: get_compressor(name, 3).compress([ids])[0] for name in POSITIONAL}
    assert kept["truncate_first"] == [0, 1, 2, 3]
    assert kept["truncate_last"] == [6, 7, 8, 9]
    assert kept["truncate_head_tail"] == [0, 1, 8, 9]
    assert kept["stride_drop"] == [0, 3, 6, 9]  # every 3rd, counted back from the last
    assert get_compressor("stride_drop", 2.5).compress([ids])[0] == [2, 4, 7, 9]


def test_random_drop_is_deterministic_for_a_seed():
    prompts = [list(range(n)) for n in (5, 17, 40)]
    first = get_compressor("random_drop", 4, seed=7).compress(prompts)
    # A fresh instance, another batch order: each prompt is dropped the same way.
    again = get_compressor("random_drop", 4, seed=7).compress(prompts[::-1])[::-1]
    assert first == again
    other = get_compressor("random_drop", 4, seed=8).compress(prompts)
    assert other[2] != first[2]
    assert first[2] != list(range(0, 40, 4))  # not a stride in disguise


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: get_method("nope", 2), "unknown method 'nope'; known methods: full"),
        (lambda: get_method("random_drop", 0.5), "must be a number >= 1, got 0.5"),
        (lambda: get_method("random_drop"), "needs a compression ratio"),
        (lambda: get_method("kmerge", 2.5).model_options(), "must be a whole number; got 2.5"),
        (lambda: get_compressor("kmerge", 2), "'kmerge' is not a token-level prompt compressor"),
        (lambda: check_compressor("full"), "'full' is not a token-level prompt compressor"),
        (lambda: check_compressor("truncate_last", 0.9), "must be a number >= 1, got 0.9"),
        (lambda: KMergeConfig(k=1, prompt_compressor="nope"), "unknown method 'nope'"),
        (lambda: KMergeConfig(k=1, prompt_compressor="stride_drop"), "needs a compression ratio"),
    ],
)
def test_bad_methods_and_ratios_are_one_line_errors(call, message):
    with pytest.raises(KMergeConfigError, match=message):
        call()


def test_check_compressor_builds_nothing_and_accepts_good_settings(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check_compressor built a compressor")

    monkeypatch.setattr(METHODS["meta_tokens"], "__init__", refuse)
    check_compressor("meta_tokens")  # takes no ratio
    check_compressor("random_drop", 2.5)


def test_method_model_options():
    assert get_method("kmerge", 4).model_options() == {"k": 4}
    assert get_method("kmerge_segments", 4).model_options() == {
        "k": 4,
        "block_alignment": "segments",
    }
    assert get_method("mean_pool", 8.0).model_options() == {"k": 8, "freeze_encoder": True}
    assert get_method("full", 4).model_options() == {"k": 1}  # takes no ratio
    assert get_method("random_drop", 2, seed=5).model_options() == {
        "k": 1,
        "prompt_compressor": "random_drop",
        "compression_ratio": 2,
        "compressor_seed": 5,
    }


# ---------------------------------------------------------------- through the model
@pytest.mark.parametrize("name", SELECTORS)
def test_the_model_feeds_the_compressed_prompt_and_reports_the_original_length(
    name, tiny_model, tokenizer
):
    prompts = prompt_texts(24)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for ratio in (2, 3):
        model = tiny_model(1, prompt_compressor=name, compression_ratio=ratio)
        batch = model.prepare(prompts, ["yes"] * len(prompts))
        assert batch.prompt_tokens == lengths
        assert batch.positions_fed == [math.ceil(n / ratio) for n in lengths]
        # The measured compression is what evaluate reports, never the target.
        result = evaluate(model, [Example(p, "yes") for p in prompts], progress=False)
        assert result["compression"] == pytest.approx(
            sum(lengths) / sum(math.ceil(n / ratio) for n in lengths)
        )


def test_token_surprisal_batched_equals_one_prompt_at_a_time(tiny_base):
    lm = tiny_base(seed=1)
    prompts = [[5, 900, 31, 7], [42], [8, 8, 8, 8, 8, 8, 8, 8, 1200]]
    batched = token_surprisal(lm, prompts, start_id=1, batch_size=2)
    for ids, scores in zip(prompts, batched):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([[1, *ids]])).logits[0, :-1]
        expected = -F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])
        assert scores == pytest.approx(expected.squeeze(-1).tolist(), abs=1e-5)


def test_self_information_keeps_the_most_surprising_tokens_of_the_base_model(tiny_model, tokenizer):
    model = tiny_model(1, seed=2, prompt_compressor="self_information", compression_ratio=3)
    prompt = "the cat sat on the mat and the dog sat on the log"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id
    scores = token_surprisal(model.lm, [ids], start)[0]
    keep = sorted(sorted(range(len(ids)), key=lambda i: -scores[i])[: math.ceil(len(ids) / 3)])
    assert model.compressor.compress([ids], model) == [[ids[i] for i in keep]]
    # Scores come from the base model: trained (here: random) LoRA weights change nothing.
    randomise_trainables(model, std=0.5)
    fresh = get_compressor("self_information", 3)
    assert fresh.compress([ids], model) == [[ids[i] for i in keep]]


# ---------------------------------------------------------------- meta-tokens
META, END = list(range(3, 17)), 0


def test_meta_tokens_are_lossless_on_repetitive_and_random_sequences():
    rng = random.Random(0)
    shrunk = 0
    for trial in range(300):
        alphabet = rng.randint(2, 30)
        ids = [rng.randrange(100, 100 + alphabet) for _ in range(rng.randint(1, 120))]
        if trial % 3 == 0:  # splice in repeats of a phrase
            phrase = ids[:5]
            ids = [
                t
                for chunk in (ids[i : i + 7] + phrase for i in range(0, len(ids), 7))
                for t in chunk
            ]
        encoded = meta_encode(ids, META, END)
        assert meta_decode(encoded, META, END) == ids
        assert len(encoded) <= len(ids)
        shrunk += len(encoded) < len(ids)
    assert shrunk > 100


def test_meta_tokens_dictionary_layout_and_cost():
    phrase = [101, 102, 103]
    ids = phrase + [50] + phrase + [51] + phrase
    # 3 occurrences of a 3-gram save 3 * 2 = 6 positions; the entry costs 3 + 1, END 1.
    assert meta_encode(ids, META, END) == [3, 101, 102, 103, END, 3, 50, 3, 51, 3]
    assert meta_encode([1, 2, 1, 2], META, END) == [1, 2, 1, 2]  # would not pay for itself


def test_meta_tokens_refuse_prompts_with_reserved_ids():
    with pytest.raises(KMergeDataError, match=r"reserved meta-token ids \[5\]"):
        meta_encode([100, 5, 100], META, END)


def test_meta_tokens_through_the_model_use_reserved_special_tokens(tiny_model, tokenizer):
    reserved = reserved_token_ids(tokenizer)
    assert len(reserved) >= 2
    assert not {tokenizer.bos_token_id, tokenizer.eos_token_id} & set(reserved)
    model = tiny_model(1, prompt_compressor="meta_tokens")
    prompt = "Tree: AB\n+CD\n++EF\n++GH\n+IJ\n++KL\n++MN\n+OP\n++QR, Parent: CD, Answer:"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    batch = model.prepare([prompt, "no repeats here"])
    assert batch.prompt_tokens[0] == len(ids)
    assert batch.positions_fed[0] < len(ids)  # measured, whatever the input allows
    assert batch.positions_fed[1] == batch.prompt_tokens[1]
    encoded = model.compressor.compress([ids], model)[0]
    assert meta_decode(encoded, reserved[1:], reserved[0]) == ids


# ---------------------------------------------------------------- mean_pool, persistence
def test_mean_pool_freezes_the_encoder_at_the_exact_mean(tiny_model, tiny_base, tmp_path):
    model = tiny_model(4, freeze_encoder=True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    optimizer = make_optimizer(model, TrainConfig(steps=1))
    assert len(optimizer.param_groups) == 1  # LoRA only
    blocks, mask = torch.randn(1, 2, 4, 32), torch.ones(1, 2, 4, dtype=torch.bool)
    assert torch.equal(model.encoder(blocks, mask), blocks.mean(dim=2))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = KMergeModel.from_pretrained(
        tmp_path / "ckpt", base=tiny_base(), tokenizer=model.tokenizer, is_trainable=True
    )
    assert not any(p.requires_grad for p in loaded.encoder.parameters())


def test_the_compressor_is_saved_and_rebuilt_with_the_checkpoint(tiny_model, tiny_base, tmp_path):
    model = tiny_model(1, prompt_compressor="random_drop", compression_ratio=4, compressor_seed=9)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = KMergeModel.from_pretrained(
        tmp_path / "ckpt", base=tiny_base(), tokenizer=model.tokenizer
    )
    assert loaded.config.prompt_compressor == "random_drop"
    prompts = prompt_texts(6, seed=1)
    a, b = model.prepare(prompts), loaded.prepare(prompts)
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)
    assert a.positions_fed == b.positions_fed


def test_llmlingua2_without_the_package_is_skipped_with_the_reason():
    reason = METHODS["llmlingua2"].unavailable_reason()
    try:
        import llmlingua  # noqa: F401
    except ImportError:
        assert reason and "llmlingua package is not installed" in reason
    else:  # installed: then only a locally available model makes it usable
        assert reason is None or "not available locally" in reason or "not a directory" in reason
