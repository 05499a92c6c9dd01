"""``kmerge bench`` on the tiny model: the compared paths do equal work (exact KV-cache sizes,
same greedy tokens up to near-ties, same
loss), the command writes its JSON, plot and table, and bad settings
fail with one clear line. No timing is asserted."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch

from kmerge.batching import tokenize_prompts
from kmerge.bench import (
    build_models,
    cached_generate,
    full_logits_loss,
    kmerge_prefill,
    kv_cache_bytes,
    raw_prefill,
    rerun_generate,
    synthetic_prompt,
)
from kmerge.cli import main
from tests.conftest import randomise_trainables
from tests.helpers import assert_greedy_equivalent


@pytest.fixture
def tiny_models(tiny_base, tokenizer):
    def make(ks):
        models = build_models(tiny_base(seed=0), tokenizer, ks)
        for model in models.values():  # non-zero LoRA (the same for every K) and encoders
            randomise_trainables(model, seed=1)
            randomise_trainables(model.encoder, seed=2)
        return models

    return make


@pytest.mark.parametrize("n", [1, 7, 64, 201])
def test_synthetic_prompt_has_exactly_n_tokens(tokenizer, n):
    prompt = synthetic_prompt(tokenizer, n, seed=n)
    assert len(tokenize_prompts(tokenizer, [prompt])[0]) == n


def test_models_share_one_language_model_and_fold_lora_once(tiny_base, tiny_models, tokenizer):
    """One copy of the LM weights serves every K (a 7B model benched at four K's must not be
    held four times); folding LoRA into the shared weights happens once, however many K's ask:
    each model's outputs stay those of its unmerged form."""
    from kmerge.bench.run import _merge_lora

    models = tiny_models([1, 2, 4])
    assert len({id(m.lm) for m in models.values()}) == 1
    assert len({id(m.encoder) for m in models.values()}) == 3
    assert [m.k for m in models.values()] == [1, 2, 4]
    prompts, answers = [synthetic_prompt(tokenizer, 37)], ["a b c"]
    with torch.no_grad():
        before = {k: full_logits_loss(m, m.prepare(prompts, answers)) for k, m in models.items()}
        _merge_lora(models, True)
        for k, model in models.items():
            assert model.lora_merged
            after = full_logits_loss(model, model.prepare(prompts, answers))
            torch.testing.assert_close(after, before[k], rtol=1e-4, atol=1e-5)
        _merge_lora(models, False)
        assert not any(m.lora_merged for m in models.values())


def test_kv_cache_is_exactly_one_kth(tiny_base, tiny_models, tokenizer):
    models = tiny_models([1, 2, 3, 4, 8])
    raw_lm = tiny_base(seed=0)
    for n in (1, 5, 16, 37, 100):
        prompt = [synthetic_prompt(tokenizer, n)]
        uncompressed = kv_cache_bytes(kmerge_prefill(models[1], prompt)[1])
        ids = torch.tensor(tokenize_prompts(tokenizer, prompt))
        assert kv_cache_bytes(raw_prefill(raw_lm, ids)[1]) == uncompressed
        for k, model in models.items():
            cache = kv_cache_bytes(kmerge_prefill(model, prompt)[1])
            # exact integer arithmetic: bytes(K) * L == bytes(1) * ceil(L / K)
            assert cache * n == uncompressed * math.ceil(n / k), (n, k)


def test_rerun_loop_generates_the_cached_tokens(tiny_models, tokenizer):
    models = tiny_models([1, 4])
    prompts = [synthetic_prompt(tokenizer, 30, seed=3)]
    eos = tokenizer.eos_token_id
    for model in models.values():
        cached = cached_generate(model, prompts, 8)
        assert len(cached[0]) == 8
        rerun = rerun_generate(model, prompts, 8)
        assert_greedy_equivalent(model, prompts, rerun, cached, exclude=[eos])  # EOS is held off


def test_full_logits_loss_equals_label_only_head(tiny_models, tokenizer):
    model = tiny_models([4])[4]
    prompts = [synthetic_prompt(tokenizer, n, seed=n) for n in (9, 22)]
    batch = model.prepare(prompts, ["positive", "a longer answer"])
    torch.testing.assert_close(full_logits_loss(model, batch), model.loss(batch).loss)


def test_bench_command_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    main(
        ["bench", "--base-model", str(tiny_dir), "--lengths", "16,40", "--ks", "1,4"]
        + ["--repeats", "2", "--warmup", "1", "--decode-tokens", "3", "--train-ks", "1,4"]
        + ["--train-batch-size", "2", "--train-prompt-tokens", "20"]
        + ["--generate-prompt-tokens", "24", "--generate-new-tokens", "3"]
        + ["--generate-repeats", "1", "--output-dir", str(out)]
    )
    printed = capsys.readouterr().out
    assert "prompt tokens | K | positions" in printed and "re-run per token" in printed
    # Inference runs merged by default; the K=1 training step (no encoder to train) only works
    # because the bench unmerges LoRA for training.
    assert "with LoRA merged into the base weights" in printed
    result = json.loads((out / "bench.json").read_text())
    assert result["settings"]["merge_lora"] is True
    assert {"machine", "settings", "prefill", "train", "generate"} <= set(result)
    assert result["machine"]["torch"] == torch.__version__
    assert [(r["prompt_tokens"], r["k"]) for r in result["prefill"]] == [
        (16, 1), (16, 4), (40, 1), (40, 4),
    ]  # fmt: skip
    median = {(r["prompt_tokens"], r["k"], key): r[key]["median"]
              for r in result["prefill"] for key in ("kmerge_s", "raw_s")}  # fmt: skip
    for row in result["prefill"]:
        n, k = row["prompt_tokens"], row["k"]
        assert row["positions"] == math.ceil(n / k)
        for key in ("kmerge_s", "encoder_s", "raw_s"):
            t = row[key]
            assert t["n"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
        # The ratios are those of the recorded times; the baseline is the raw model at K = 1.
        kmerge_s, raw_s = median[n, k, "kmerge_s"], median[n, k, "raw_s"]
        uncompressed = median[n, 1, "raw_s"]
        assert row["speedup"] == pytest.approx(uncompressed / kmerge_s)
        assert row["limit_speedup"] == pytest.approx(uncompressed / raw_s)
        assert row["fraction_of_limit"] == pytest.approx(raw_s / kmerge_s)
        assert row["overhead_vs_raw"] == pytest.approx(kmerge_s / raw_s - 1)
        assert row["kv_cache_bytes"] * n == row["kv_cache_bytes_uncompressed"] * math.ceil(n / k)
        assert "peak" in row["peak_memory"]
    assert {(r["k"], r["lm_head"]) for r in result["train"]["rows"]} == {
        (1, "labels"), (1, "full"), (4, "labels"), (4, "full"),
    }  # fmt: skip
    generate = result["generate"]
    assert generate["new_tokens"] == 3 and generate["cached_s"]["median"] > 0
    assert generate["speedup"] == pytest.approx(
        generate["rerun_s"]["median"] / generate["cached_s"]["median"]
    )
    assert generate["cached_tokens_per_s"] == pytest.approx(3 / generate["cached_s"]["median"])
    png = out / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).ndim == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ks", "0,4"], "K must be an integer >= 1, got 0"),
        (["--lengths", ""], "lengths needs at least one value"),
        (["--lengths", "16,abc"], "--lengths takes comma-separated numbers"),
        (["--repeats", "0"], "repeats must be >= 1"),
        (["--lengths", "1000"], "prompt length 1000 (+ 0 decode tokens) is larger than the"),
    ],
)
def test_bench_bad_settings(tiny_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["bench", "--base-model", str(tiny_dir), "--no-train", "--no-generate"]
            + ["--decode-tokens", "0", "--output-dir", str(tmp_path / "b"), *args]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kmerge: error: ") and message in err


def test_bench_can_measure_lora_unmerged(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    main(
        ["bench", "--base-model", str(tiny_dir), "--lengths", "12", "--ks", "1,2", "--repeats"]
        + ["1", "--warmup", "0", "--decode-tokens", "0", "--no-train", "--no-generate"]
        + ["--no-merge-lora", "--output-dir", str(out)]
    )
    assert "with LoRA beside the base weights" in capsys.readouterr().out
    assert json.loads((out / "bench.json").read_text())["settings"]["merge_lora"] is False
