"""KMergeModel on tiny random base models: equivalences, labels, generation, persistence,
mismatch errors and a short training run."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from kmerge.errors import KMergeConfigError, KMergeDataError
from kmerge.modeling import (
    ADAPTER_FILES,
    CONFIG_FILE,
    ENCODER_FILE,
    KMergeConfig,
    KMergeModel,
)
from tests.conftest import randomise_trainables
from tests.helpers import assert_greedy_equivalent

WORDS = (
    "the cat sat on a mat and then it ran to see why my red hat was in big box "
    "but not all of you can say how old this dog is now"
).split()

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat",
    "one two three four",
]
ANSWERS = ["yes", "Paris", "a longer answer here", "five"]


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_of_length(tokenizer, n):
    """A prompt of exactly ``n`` tokens (checked), made of common one-token words."""
    text = " ".join(WORDS[:n])
    assert n_tokens(tokenizer, text) == n, text
    return text


SEGMENTED = "name: Bob, age: 42, city: Paris\nnext line here, ok"


def ragged_prompts(tokenizer, k):
    """Very different lengths: 1 token, shorter than K, exact multiples of K, and long; plus
    one with commas and a newline (segment starts)."""
    lengths = sorted({1, max(1, k - 1), k, 2 * k, 3 * k + 1, 29})
    return [prompt_of_length(tokenizer, n) for n in lengths] + [SEGMENTED]


def answers_for(prompts):
    pool = ["yes", "no way", "blue", "a longer answer here", "42", "Paris is the one"]
    return [pool[i % len(pool)] for i in range(len(prompts))]


def reference_answer_loss(logits, prompt_len, ids):
    """Mean cross-entropy of ``ids[prompt_len:]`` given logits over the whole sequence."""
    return F.cross_entropy(logits[prompt_len - 1 : -1], ids[prompt_len:])


# ------------------------------------------------------------------ K = 1 is the base model
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_k1_fresh_model_equals_base(tiny_model, tiny_base, tokenizer, arch):
    """With K = 1 and LoRA B still zero, logits and loss are those of the untouched base model
    fed ``prompt + " " + answer + EOS`` as ordinary tokens."""
    model = tiny_model(1, seed=3, arch=arch)
    base = tiny_base(seed=3, arch=arch)  # an untouched copy (from_base injects LoRA in place)
    prompt, answer = PROMPTS[2], "a longer answer here"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt_ids + answer_ids + [tokenizer.eos_token_id])

    with torch.no_grad():
        ref_logits = base(input_ids=ids[None]).logits[0]
        hidden = model.lm.get_decoder()(input_ids=ids[None]).last_hidden_state
        logits = model.lm.get_output_embeddings()(hidden)[0]
        out = model.loss(model.prepare([prompt], [answer]))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    expected = reference_answer_loss(ref_logits, len(prompt_ids), ids)
    assert out.answer_tokens.tolist() == [len(answer_ids) + 1]
    torch.testing.assert_close(out.example_losses[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)


def test_k1_prepend_bos_equals_base_with_bos(tiny_model, tiny_base, tokenizer):
    """prepend_bos at K = 1 is the base model fed [BOS] + prompt + answer + EOS."""
    model = tiny_model(1, prepend_bos=True)
    base = tiny_base()
    prompt, answer = PROMPTS[1], "Paris"
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(prompt_ids + answer_ids + [tokenizer.eos_token_id])
    with torch.no_grad():
        expected = reference_answer_loss(base(input_ids=ids[None]).logits[0], len(prompt_ids), ids)
        out = model([prompt], [answer])
    torch.testing.assert_close(out.example_losses[0], expected, rtol=0, atol=1e-5)


def test_prepend_bos_needs_a_bos_token(tiny_base, tokenizer):
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    model = KMergeModel.from_base(tiny_base(), KMergeConfig(k=2, prepend_bos=True), no_bos)
    with pytest.raises(KMergeConfigError, match="prepend_bos=True but the tokenizer has no BOS"):
        model.prepare(["Hi"])


def test_randomised_trainables_are_active(tiny_model):
    """The helper really changes the model: loss moves once LoRA and encoder are non-zero."""
    model = tiny_model(4)
    with torch.no_grad():
        before = model(PROMPTS, ANSWERS).example_losses
        assert randomise_trainables(model, seed=1) > 0
        after = model(PROMPTS, ANSWERS).example_losses
    assert (before - after).abs().min() > 1e-4


# ------------------------------------------------------------------ batch == one by one
def check_batch_equals_single(model, prompts, answers):
    """Per-example losses of the batch equal those of one at a time, and its greedy
    generations too, up to near-ties (tests/helpers.py)."""
    with torch.no_grad():
        batch = model(prompts, answers).example_losses
        single = torch.cat([model([p], [a]).example_losses for p, a in zip(prompts, answers)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)
    together = model.generate_ids(prompts, max_new_tokens=6)
    alone = [model.generate_ids([p], max_new_tokens=6)[0] for p in prompts]
    assert_greedy_equivalent(model, prompts, together, alone)
    return together


@pytest.mark.parametrize("align", ["start", "end", "segments"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_batch_equals_single(tiny_model, tokenizer, k, align):
    """Padding never leaks: per-example losses and greedy generations of a ragged batch equal
    those of each example run alone (trainables randomised so encoder MLP and LoRA act)."""
    model = tiny_model(k, block_alignment=align)
    randomise_trainables(model, seed=k)
    prompts = ragged_prompts(tokenizer, k)
    generated = check_batch_equals_single(model, prompts, answers_for(prompts))
    assert all(len(row) <= 6 for row in generated)
    assert any(len(row) > 0 for row in generated)


@pytest.mark.parametrize(
    "options",
    [
        {"prepend_bos": True},
        {"encoder_input_norm": True, "encoder_layers": 3, "encoder_hidden_size": 16},
        {"prepend_bos": True, "block_alignment": "segments", "encoder_input_norm": True},
        {"encoder_context": 1},
        {"encoder_context": 2, "block_alignment": "segments", "protect_pattern": r"[,:]"},
    ],
)
def test_batch_equals_single_options(tiny_model, tokenizer, options):
    """The same with the optional BOS prefix and encoder variants (K = 4)."""
    model = tiny_model(4, **options)
    randomise_trainables(model, seed=8)
    prompts = ragged_prompts(tokenizer, 4)
    check_batch_equals_single(model, prompts, answers_for(prompts))


@pytest.mark.parametrize("align", ["start", "end", "segments"])
def test_batch_equals_single_qwen2(tiny_model, tokenizer, align):
    """The same with a Qwen2 base (biased q/k/v projections): nothing is Llama-specific."""
    model = tiny_model(4, arch="qwen2", block_alignment=align)
    randomise_trainables(model, seed=7)
    prompts = ragged_prompts(tokenizer, 4)
    check_batch_equals_single(model, prompts, answers_for(prompts))


def test_block_alignment_matters(tiny_model, tokenizer):
    """ "start" and "end" cut a 7-token prompt differently at K = 4, so the loss differs."""
    prompt = prompt_of_length(tokenizer, 7)
    losses = []
    for align in ("start", "end"):
        model = tiny_model(4, block_alignment=align)
        randomise_trainables(model, seed=0)
        with torch.no_grad():
            losses.append(model([prompt], ["yes"]).loss)
    assert (losses[0] - losses[1]).abs() > 1e-5


# ------------------------------------------------------------------ labels only on answers
def test_loss_reads_only_answer_positions(tiny_model, tokenizer):
    """The LM head runs on exactly (answer + EOS) rows; the prompt conditions the loss."""
    model = tiny_model(4)
    randomise_trainables(model, seed=2)
    head_rows = []
    hook = model.lm.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_rows.append(args[0].shape)
    )
    try:
        with torch.no_grad():
            out = model(PROMPTS, ANSWERS)
    finally:
        hook.remove()
    expected = [n_tokens(tokenizer, " " + a) + 1 for a in ANSWERS]
    assert out.answer_tokens.tolist() == expected
    assert len(head_rows) == 1
    assert head_rows[0] == (sum(expected), model.lm.config.hidden_size)
    # the batch loss is the mean over all answer tokens, not over examples
    weighted = (out.example_losses * out.answer_tokens).sum() / out.answer_tokens.sum()
    torch.testing.assert_close(out.loss, weighted)

    with torch.no_grad():
        changed = model(["Bye", *PROMPTS[1:]], ANSWERS).example_losses
    assert (changed[0] - out.example_losses[0]).abs() > 1e-5
    torch.testing.assert_close(changed[1:], out.example_losses[1:], rtol=0, atol=1e-5)


def test_loss_without_answers_is_refused(tiny_model):
    model = tiny_model(2)
    with pytest.raises(KMergeConfigError, match="loss needs answers"):
        model.loss(model.prepare(["Hi"]))


# ------------------------------------------------------------------ generation
def uncached_greedy(model, prompt, n_new):
    """Greedy decoding the slow way: re-run the whole sequence (no KV cache) for every token."""
    embed = model.lm.get_input_embeddings()
    generated = []
    with torch.no_grad():
        for _ in range(n_new):
            batch = model.prepare([prompt])
            embeds = batch.inputs_embeds
            if generated:
                embeds = torch.cat([embeds, embed(torch.tensor([generated]))], dim=1)
            positions = torch.arange(embeds.shape[1])[None]
            hidden = model.lm.get_decoder()(
                inputs_embeds=embeds, position_ids=positions, use_cache=False
            ).last_hidden_state
            logits = model.lm.get_output_embeddings()(hidden[:, -1])
            generated.append(int(logits.argmax(dim=-1)))
    return generated


def cut_at_eos(ids, eos):
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.mark.parametrize("k", [1, 4])
def test_cached_generation_equals_uncached(tiny_model, tokenizer, k):
    """transformers' KV-cached generate on merged embeddings equals recomputing from scratch."""
    model = tiny_model(k)
    randomise_trainables(model, seed=5)
    eos = tokenizer.eos_token_id
    for prompt in (PROMPTS[0], PROMPTS[2]):
        expected = cut_at_eos(uncached_greedy(model, prompt, 8), eos)
        cached = model.generate_ids([prompt], max_new_tokens=8)[0]
        assert_greedy_equivalent(model, prompt, cached, expected)
        assert len(expected) > 0


def test_generate_accepts_a_prepared_batch(tiny_model):
    model = tiny_model(4)
    randomise_trainables(model, seed=5)
    batch = model.prepare(PROMPTS, reserve=5)
    assert model.generate_ids(batch, max_new_tokens=5) == model.generate_ids(
        PROMPTS, max_new_tokens=5
    )


def test_generate_restores_training_mode(tiny_model):
    model = tiny_model(2).train()
    model.generate(["Hi"], max_new_tokens=2)
    assert model.training and model.lm.training


def test_failed_generate_restores_training_mode(tiny_model):
    """A generate call that is refused (prompt too long) must not leave the model in eval mode."""
    model = tiny_model(1, base_overrides={"max_position_embeddings": 16}).train()
    with pytest.raises(KMergeDataError, match="needs"):
        model.generate(["a long prompt " * 10], max_new_tokens=4)
    assert model.training


def test_sampling_is_reproducible(tiny_model):
    """Sampling returns strings, the same seed gives the same output, and it is not greedy."""
    model = tiny_model(4)
    randomise_trainables(model, seed=6)

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(PROMPTS, max_new_tokens=8, do_sample=True, top_k=5)

    first = sample(0)
    assert len(first) == len(PROMPTS) and all(isinstance(s, str) for s in first)
    assert sample(0) == first
    others = [sample(seed) for seed in (1, 2, 3)]
    assert any(o != first for o in others)


# ------------------------------------------------------------------ save / load
def losses_and_generations(model):
    with torch.no_grad():
        losses = model(PROMPTS, ANSWERS).example_losses
    return losses, model.generate_ids(PROMPTS, max_new_tokens=6)


def trained_tensors(model):
    """LoRA and encoder tensors by name: what a checkpoint must restore bit for bit."""
    return {n: p for n, p in model.state_dict().items() if "lora_" in n or "encoder." in n}


def assert_same_trained_tensors(loaded, model):
    expected, got = trained_tensors(model), trained_tensors(loaded)
    assert expected and got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize(
    "k, options",
    [
        (1, {}),
        (4, {}),
        (4, {"prepend_bos": True, "block_alignment": "segments", "encoder_input_norm": True}),
        (4, {"merge_pooling": "attention"}),
        (4, {"encoder_context": 1}),
    ],
)
def test_save_load_round_trip(tiny_model, tiny_base, tokenizer, tmp_path, k, options):
    """A saved model reloaded onto an identical base has bit-identical trained tensors, so the
    same losses (up to float rounding) and greedy generations (up to near-ties)."""
    options = {"block_alignment": "end", **options}
    model = tiny_model(k, seed=11, lora_r=4, **options)
    randomise_trainables(model, seed=12)
    losses, generations = losses_and_generations(model)

    target = tmp_path / "ckpt"
    assert model.save_pretrained(target) == target
    assert (CONFIG_FILE, ENCODER_FILE, *ADAPTER_FILES) == (
        "kmerge_config.json",
        "encoder.safetensors",
        "adapter_config.json",
        "adapter_model.safetensors",
    )
    for name in (CONFIG_FILE, ENCODER_FILE, *ADAPTER_FILES, "tokenizer/tokenizer.json"):
        assert (target / name).is_file(), name

    loaded = KMergeModel.from_pretrained(target, base=tiny_base(seed=11), tokenizer=tokenizer)
    assert loaded.config == model.config
    assert loaded.config.lora_r == 4 and loaded.config.block_alignment == options["block_alignment"]
    assert_same_trained_tensors(loaded, model)
    loaded_losses, loaded_generations = losses_and_generations(loaded)
    torch.testing.assert_close(loaded_losses, losses, rtol=0, atol=1e-5)
    assert_greedy_equivalent(loaded, PROMPTS, loaded_generations, generations)
    assert loaded.trainable_parameters() == []


def test_from_pretrained_trainable(tiny_model, tiny_base, tokenizer, tmp_path):
    """is_trainable=True gives back LoRA and encoder parameters to optimise."""
    model = tiny_model(4)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = KMergeModel.from_pretrained(
        tmp_path / "ckpt", base=tiny_base(), tokenizer=tokenizer, is_trainable=True
    )
    names = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.") for n in names)
    assert any("lora_B" in n for n in names)
    assert len(loaded.trainable_parameters()) == len(model.trainable_parameters())


def test_save_twice_overwrites_atomically(tiny_model, tiny_base, tokenizer, tmp_path):
    """Saving again to the same directory replaces it and leaves no temporary siblings."""
    model = tiny_model(4)
    randomise_trainables(model, seed=1)
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    randomise_trainables(model, seed=2)
    second, _ = losses_and_generations(model)
    model.save_pretrained(target)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = KMergeModel.from_pretrained(target, base=tiny_base(), tokenizer=tokenizer)
    assert_same_trained_tensors(loaded, model)
    torch.testing.assert_close(losses_and_generations(loaded)[0], second, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ mismatch errors
@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    """A saved K = 4 checkpoint on the seed-0 tiny Llama."""
    model = tiny_model(4)
    randomise_trainables(model, seed=3)
    return model.save_pretrained(tmp_path / "ckpt")


def test_refuses_base_with_other_weights(checkpoint, tiny_base, tokenizer):
    with pytest.raises(KMergeConfigError, match="different base model.*embedding_sha1"):
        KMergeModel.from_pretrained(checkpoint, base=tiny_base(seed=1), tokenizer=tokenizer)


def test_refuses_base_with_other_hidden_size(checkpoint, tiny_base, tokenizer):
    base = tiny_base(hidden_size=16)
    with pytest.raises(KMergeConfigError, match=r"different base model.*'hidden_size': \(32, 16\)"):
        KMergeModel.from_pretrained(checkpoint, base=base, tokenizer=tokenizer)


@pytest.mark.parametrize("new_k", [1, 2, 8])
def test_refuses_edited_k(checkpoint, tiny_base, tokenizer, new_k):
    """A config whose K disagrees with the saved encoder is caught, not loaded half-way."""
    path = checkpoint / CONFIG_FILE
    data = json.loads(path.read_text())
    assert data["k"] == 4
    data["k"] = new_k
    path.write_text(json.dumps(data))
    with pytest.raises(
        KMergeConfigError, match=f"config says K={new_k} but the saved encoder was trained with K=4"
    ):
        KMergeModel.from_pretrained(checkpoint, base=tiny_base(), tokenizer=tokenizer)


@pytest.mark.parametrize(
    "edit",
    [
        {"encoder_input_norm": True},
        {"encoder_layers": 3},
        {"encoder_hidden_size": 8},
        {"encoder_context": 1},
    ],
)
def test_refuses_edited_encoder_shape(checkpoint, tiny_base, tokenizer, edit):
    """Any encoder setting that disagrees with the saved tensors is caught."""
    path = checkpoint / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(KMergeConfigError, match="the saved encoder does not match"):
        KMergeModel.from_pretrained(checkpoint, base=tiny_base(), tokenizer=tokenizer)


@pytest.mark.parametrize("missing", [ENCODER_FILE, CONFIG_FILE, "adapter_model.safetensors"])
def test_refuses_incomplete_checkpoint(checkpoint, tiny_base, tokenizer, missing):
    (checkpoint / missing).unlink()
    with pytest.raises(KMergeConfigError, match=f"is missing {missing}"):
        KMergeModel.from_pretrained(checkpoint, base=tiny_base(), tokenizer=tokenizer)


def test_refuses_missing_directory(tiny_base, tokenizer, tmp_path):
    with pytest.raises(KMergeConfigError, match="does not exist or is not a directory"):
        KMergeModel.from_pretrained(tmp_path / "nope", base=tiny_base(), tokenizer=tokenizer)
    (tmp_path / "file").write_text("x")
    with pytest.raises(KMergeConfigError, match="does not exist or is not a directory"):
        KMergeModel.from_pretrained(tmp_path / "file", base=tiny_base(), tokenizer=tokenizer)


def test_refuses_unknown_config_key(checkpoint, tiny_base, tokenizer):
    path = checkpoint / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "kk": 3}))
    with pytest.raises(KMergeConfigError, match="unknown kmerge config keys: kk"):
        KMergeModel.from_pretrained(checkpoint, base=tiny_base(), tokenizer=tokenizer)


def test_model_object_needs_tokenizer(checkpoint, tiny_base):
    with pytest.raises(KMergeConfigError, match="from_base with a model object also needs"):
        KMergeModel.from_base(tiny_base(), KMergeConfig(k=2))
    with pytest.raises(KMergeConfigError, match="from_pretrained with a model object also"):
        KMergeModel.from_pretrained(checkpoint, base=tiny_base())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "K must be an integer >= 1, got 0"),
        ({"k": 2.5}, r"K must be an integer >= 1, got 2\.5 \(float\)"),
        ({"k": True}, r"got True \(bool\)"),
        ({"block_alignment": "middle"}, "block_alignment must be 'start', 'end' or 'segm"),
        ({"lora_r": 0}, "lora_r must be >= 1, got 0"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(KMergeConfigError, match=message):
        KMergeConfig(**kwargs)


def test_config_round_trip():
    config = KMergeConfig(k=3, block_alignment="end", lora_target_modules=["q_proj"])
    assert KMergeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_base_does_not_mutate_config(tiny_base, tokenizer):
    config = KMergeConfig(k=2)
    model = KMergeModel.from_base(tiny_base(), config, tokenizer=tokenizer)
    assert config.base_fingerprint == {}
    assert model.config.base_fingerprint["hidden_size"] == 32


# ------------------------------------------------------------------ training
TRAIN_PAIRS = [
    ("What is the capital of France?", "Paris"),
    ("2 plus 2", "four"),
    ("Colour of the sky", "blue"),
    ("Opposite of hot", "cold"),
    ("The first letter", "A"),
    ("A baby cat is a", "kitten"),
    ("Water freezes at", "zero degrees"),
    ("Say hello", "hello there"),
]


def test_training_reduces_loss(tiny_base, tokenizer):
    """K = 4, 60 AdamW steps on 8 pairs halve the loss; the first backward reaches the
    encoder's zero-initialised last layer and LoRA B (both zero at init).

    With the standard 0.02 init, a frozen random LM head (after a frozen RMSNorm) can only
    produce logits of about +-0.6, which caps how far *any* adapter can lower the loss
    (10.85 -> ~10.2). The head is therefore scaled up so that the frozen base can express
    confident predictions; the trainable parts are untouched."""
    base = tiny_base()
    with torch.no_grad():
        base.lm_head.weight.mul_(25.0)
    model = KMergeModel.from_base(base, KMergeConfig(k=4), tokenizer=tokenizer).train()
    params = model.trainable_parameters()
    assert params and all(not p.requires_grad for p in base.get_input_embeddings().parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    prompts, answers = zip(*TRAIN_PAIRS)
    losses = []
    for step in range(60):
        loss = model(list(prompts), list(answers)).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            last = model.encoder.mlp[-1]
            assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
            lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
            assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
            frozen = [p for p in model.parameters() if not p.requires_grad]
            assert all(p.grad is None for p in frozen)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_copy_of_checkpoint_loads(checkpoint, tiny_base, tokenizer, tmp_path):
    """A checkpoint is self-contained: copied elsewhere it still loads."""
    moved = shutil.copytree(checkpoint, tmp_path / "elsewhere" / "copy")
    loaded = KMergeModel.from_pretrained(moved, base=tiny_base(), tokenizer=tokenizer)
    assert loaded.k == 4


# ------------------------------------------------------------------ merged LoRA (inference)
def test_merge_lora_keeps_outputs_and_undoes(tiny_model, tmp_path):
    """Folding LoRA into the base weights changes losses only by float rounding and leaves the
    greedy tokens as they were (up to near-ties); batched still equals one by one; unmerging
    restores the base weights; the saved adapter is the same whether merged or not."""
    model = tiny_model(4)
    randomise_trainables(model, seed=1, std=0.05)
    base_weights = {n: p.clone() for n, p in model.lm.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        before = model(PROMPTS, ANSWERS).example_losses
        tokens = model.generate_ids(PROMPTS, max_new_tokens=6)
        assert not model.lora_merged and model.merge_lora() is model and model.lora_merged
        changed = [n for n, p in model.lm.named_parameters() if n in base_weights
                   and not torch.equal(p, base_weights[n])]  # fmt: skip
        assert changed  # the LoRA update really went into the base weights
        torch.testing.assert_close(model(PROMPTS, ANSWERS).example_losses, before)
        merged_tokens = check_batch_equals_single(model, PROMPTS, ANSWERS)
        assert_greedy_equivalent(model, PROMPTS, merged_tokens, tokens)
        model.merge_lora()  # a second merge is a no-op, not a double update
        torch.testing.assert_close(model(PROMPTS, ANSWERS).example_losses, before)
        model.save_pretrained(tmp_path / "merged")
        model.unmerge_lora()
    assert not model.lora_merged
    for name, p in model.lm.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(p, base_weights[name], rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "unmerged")
    for f in ("adapter_model.safetensors", "encoder.safetensors"):
        assert (tmp_path / "merged" / f).read_bytes() == (tmp_path / "unmerged" / f).read_bytes()
