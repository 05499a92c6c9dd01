"""KMergeModel on base models of other families than Llama and Qwen2 (tiny, random, built from
a config alone: tests/conftest.py TINY_ARCHS): Mistral and Gemma 2/3 (sliding-window
attention), Phi-3 (fused projections, partial rotary), Gemma 3 (embeddings scaled inside the
embedding module, tied head), Gemma 2 (soft-capped LM head and attention), Cohere and Granite
(logits scaled after the head), GPT-2 (learned absolute positions, Conv1D layers). And the
base models kmerge refuses, each in one line."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    LlamaForCausalLM,
    LlamaModel,
    T5Config,
    T5ForConditionalGeneration,
)

from kmerge.errors import KMergeConfigError
from kmerge.methods.self_information import token_surprisal
from kmerge.modeling import KMergeConfig, KMergeModel
from tests.conftest import randomise_trainables, tiny_config
from tests.helpers import assert_greedy_equivalent, next_token_logits
from tests.test_modeling import (
    PROMPTS,
    SEGMENTED,
    answers_for,
    assert_same_trained_tensors,
    check_batch_equals_single,
    losses_and_generations,
    prompt_of_length,
    reference_answer_loss,
)

FAMILIES = ["mistral", "phi3", "gemma3", "gemma2", "cohere", "granite", "gpt2"]
#: Families whose forward changes the logits after the LM head (soft cap, logit scaling).
HEAD_TRANSFORMS = ["gemma2", "cohere", "granite"]
SLIDING = ["mistral", "gemma3", "gemma2"]  # window 4 in the tiny configs


def long_prompt(tokenizer):
    return prompt_of_length(tokenizer, 29)


def family_prompts(tokenizer):
    """Ragged lengths, several longer than the sliding window of 4 even when merged at K=4."""
    return [prompt_of_length(tokenizer, n) for n in (1, 3, 8, 17)] + [
        long_prompt(tokenizer),
        SEGMENTED,
    ]


# ------------------------------------------------------------------ K = 1 is the base model
@pytest.mark.parametrize("arch", FAMILIES)
def test_k1_logits_equal_base(tiny_model, tiny_base, tokenizer, arch):
    """At K = 1 with LoRA B zero, the logits KMergeModel computes at answer positions (and so
    its loss) are the untouched base model's, head transformations included."""
    model = tiny_model(1, seed=3, arch=arch)
    base = tiny_base(seed=3, arch=arch)
    prompt, answer = long_prompt(tokenizer), "a longer answer here"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt_ids + answer_ids + [tokenizer.eos_token_id])
    with torch.no_grad():
        ref_logits = base(input_ids=ids[None]).logits[0]
        states = model.answer_states(model.prepare([prompt], [answer]))
    torch.testing.assert_close(
        states.logits, ref_logits[len(prompt_ids) - 1 : -1], rtol=1e-5, atol=1e-5
    )
    expected = reference_answer_loss(ref_logits, len(prompt_ids), ids)
    assert states.output.answer_tokens.tolist() == [len(answer_ids) + 1]
    torch.testing.assert_close(states.output.loss, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", HEAD_TRANSFORMS)
def test_head_transform_matters(tiny_base, tokenizer, arch):
    """The tiny configs make the family's logit transformation change the logits, so the test
    above would catch a loss that applied the bare LM head only."""
    base = tiny_base(seed=3, arch=arch)
    ids = torch.tensor([tokenizer(long_prompt(tokenizer), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        bare = base.get_output_embeddings()(base.get_decoder()(input_ids=ids).last_hidden_state)
        full = base(input_ids=ids).logits
    assert (bare - full).abs().max() > 0.1


@pytest.mark.parametrize("arch", SLIDING)
def test_sliding_window_matters(tiny_model, tokenizer, arch):
    """The window of 4 really limits attention in these tests: a wide window gives other
    losses on prompts longer than 4 positions, merged or not."""
    prompts, answers = [long_prompt(tokenizer)], ["a longer answer here"]
    for k in (1, 4):
        narrow = tiny_model(k, seed=2, arch=arch)
        wide = tiny_model(k, seed=2, arch=arch, base_overrides={"sliding_window": 256})
        with torch.no_grad():
            diff = narrow(prompts, answers).loss - wide(prompts, answers).loss
        assert diff.abs() > 1e-4, (k, diff)


# ------------------------------------------------------------------ batch == one by one
@pytest.mark.parametrize("arch", FAMILIES)
def test_batch_equals_single(tiny_model, tokenizer, arch):
    """K = 4, ragged lengths (left padding): batched losses and greedy generations equal
    those of one example at a time."""
    model = tiny_model(4, seed=1, arch=arch, block_alignment="segments")
    randomise_trainables(model, seed=4)
    prompts = family_prompts(tokenizer)
    check_batch_equals_single(model, prompts, answers_for(prompts))


# ------------------------------------------------------------------ generation
def uncached_greedy(model, prompt, n_new):
    """Greedy decoding by re-running the base model's full forward (its own head, no KV cache)
    for every token, stopping at EOS."""
    generated = []
    for _ in range(n_new):
        token = int(next_token_logits(model, prompt, generated).argmax())
        if token == model.tokenizer.eos_token_id:
            break
        generated.append(token)
    return generated


@pytest.mark.parametrize("arch", FAMILIES)
def test_cached_generation_equals_uncached(tiny_model, tokenizer, arch):
    """KV-cached generate from merged embeddings (+ position ids) equals recomputing, for more
    new tokens than the sliding window."""
    model = tiny_model(4, seed=1, arch=arch)
    randomise_trainables(model, seed=5)
    for prompt in (PROMPTS[0], long_prompt(tokenizer)):
        cached = model.generate_ids([prompt], max_new_tokens=8)[0]
        assert_greedy_equivalent(model, prompt, cached, uncached_greedy(model, prompt, 8))
    assert all(isinstance(s, str) for s in model.generate(PROMPTS, max_new_tokens=3))


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("arch", FAMILIES)
def test_save_load_round_trip(tiny_model, tiny_base, tokenizer, tmp_path, arch):
    model = tiny_model(4, seed=11, arch=arch, lora_r=4)
    randomise_trainables(model, seed=12)
    losses, generations = losses_and_generations(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = KMergeModel.from_pretrained(
        tmp_path / "ckpt", base=tiny_base(seed=11, arch=arch), tokenizer=tokenizer
    )
    assert loaded.config == model.config
    assert loaded.config.base_fingerprint["model_type"] == model.lm.config.model_type
    assert_same_trained_tensors(loaded, model)
    loaded_losses, loaded_generations = losses_and_generations(loaded)
    torch.testing.assert_close(loaded_losses, losses, rtol=0, atol=1e-5)
    assert_greedy_equivalent(loaded, PROMPTS, loaded_generations, generations)


# ------------------------------------------------------------------ the frozen base's scores
@pytest.mark.parametrize("arch", HEAD_TRANSFORMS)
def test_surprisal_uses_the_models_head(tiny_base, tokenizer, arch):
    """self_information's token surprisal is the base model's own, head transformation
    included."""
    base = tiny_base(seed=3, arch=arch)
    ids = tokenizer(long_prompt(tokenizer), add_special_tokens=False)["input_ids"]
    start = tokenizer.eos_token_id
    got = torch.tensor(token_surprisal(base, [ids], start)[0])
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([[start, *ids]])).logits[0, :-1]
    expected = -F.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ refused base models
class DoubledLogits(LlamaForCausalLM):
    """A causal LM whose forward transforms the logits in a way kmerge does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2 + 1
        return out


class NotAnLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)


def tiny_t5(vocab):
    return T5ForConditionalGeneration(
        T5Config(vocab_size=vocab, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=8)
    )


def tiny_gemma3_multimodal(vocab):
    text = tiny_config(vocab, "gemma3").to_dict()
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=vocab - 1
    )
    return Gemma3ForConditionalGeneration(config)


@pytest.mark.parametrize(
    "make, message",
    [
        (tiny_t5, r"T5ForConditionalGeneration \(model type 't5'\) is an encoder-decoder model"),
        (lambda v: LlamaModel(tiny_config(v)), r"LlamaModel .* has no LM head"),
        (lambda v: NotAnLM(), r"NotAnLM .* is not a transformers causal LM"),
        (
            tiny_gemma3_multimodal,
            r"Gemma3ForConditionalGeneration .* cannot generate from input embeddings",
        ),
        (
            lambda v: DoubledLogits(tiny_config(v)),
            r"DoubledLogits .* computes its logits in a way kmerge does not reproduce",
        ),
    ],
    ids=["encoder-decoder", "no-head", "not-a-model", "multimodal", "unknown-head"],
)
def test_unsupported_base_is_refused(tokenizer, make, message):
    torch.manual_seed(0)
    base = make(len(tokenizer))
    with pytest.raises(KMergeConfigError, match=message) as info:
        KMergeModel.from_base(base, KMergeConfig(k=2), tokenizer=tokenizer)
    assert "\n" not in str(info.value)
    assert all(p.requires_grad for p in base.parameters())  # refused before it was touched


def test_encoder_decoder_directory_is_refused(tokenizer, tmp_path):
    """By name or path too: a model directory of an encoder-decoder model."""
    tiny_t5(len(tokenizer)).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    with pytest.raises(KMergeConfigError, match="not a causal LM|encoder-decoder") as info:
        KMergeModel.from_base(str(tmp_path / "t5"), KMergeConfig(k=2))
    assert "\n" not in str(info.value)
