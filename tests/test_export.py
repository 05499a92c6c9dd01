"""``kmerge export``: a plain HF folder with LoRA folded in, and the vLLM backend over it."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kmerge.cli import main
from kmerge.export import export
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.serving.backends.vllm import decode_embeds
from kmerge.serving.config import ServeConfig
from kmerge.serving.server import ServerThread, build_app
from tests.conftest import randomise_trainables
from tests.fake_vllm import fake_vllm_app
from tests.helpers import assert_greedy_equivalent

PROMPTS = ["Review: the shoes fell apart after a week, Label:", "A is the parent of B. B is"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    from tests.conftest import build_tiny_base

    root = tmp_path_factory.mktemp("export")
    build_tiny_base(len(tokenizer), seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = KMergeModel.from_base(str(root / "base"), KMergeConfig(k=4))
    randomise_trainables(model, seed=1, std=0.05)  # LoRA B != 0: folding changes the weights
    checkpoint = model.save_pretrained(root / "ckpt")
    return checkpoint, export(checkpoint, root / "out"), root / "base"


def test_export_loads_as_plain_model_with_the_same_logits(exported):
    checkpoint, out, base_dir = exported
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in hf.state_dict())
    kmerge = KMergeModel.from_pretrained(checkpoint).eval()
    batch = kmerge.prepare(PROMPTS, ["positive", "the parent"])
    inputs = dict(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )
    with torch.no_grad():
        want = kmerge.lm(**inputs).logits  # LoRA beside the weights, as trained
        got = hf(**inputs).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(**inputs).logits
    real = batch.attention_mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert (plain[real] - want[real]).abs().max() > 1e-2  # the LoRA update is really in there
    encoder = load_file(out / "kmerge" / "encoder.safetensors")
    saved = load_file(checkpoint / "encoder.safetensors")
    assert encoder.keys() == saved.keys() and all(torch.equal(encoder[k], saved[k]) for k in saved)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # vLLM
    assert (out / "kmerge" / "kmerge_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_export_refuses_a_non_empty_folder(exported, capsys):
    checkpoint, out, _ = exported
    with pytest.raises(SystemExit) as err:
        main(["export", str(checkpoint), str(out)])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmerge: error: ") and "not empty" in lines[0]


def test_vllm_backend_sends_prompt_embeds_and_relays_the_answer(exported):
    checkpoint, out, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    model = KMergeModel.from_pretrained(checkpoint).eval()
    fake = fake_vllm_app(hf, model.tokenizer)
    with ServerThread(fake, ServeConfig()) as vllm:
        config = ServeConfig(backend="vllm", vllm_url=vllm.url, served_model_name="m")
        with ServerThread(build_app(config, model), config) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
            out_ids = []
            for prompt in PROMPTS:
                r = client.completions.create(
                    model="m",
                    prompt=prompt,
                    max_tokens=10,
                    temperature=0,
                    extra_body={"return_token_ids": True},
                )
                out_ids.append(r.choices[0].model_extra["token_ids"])
                assert (
                    r.usage.model_extra["prompt_positions"]
                    == model.prepare([prompt]).positions_fed[0]
                )
                streamed = client.completions.create(
                    model="m", prompt=prompt, max_tokens=10, temperature=0, stream=True
                )
                assert (
                    "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
                )
            assert_greedy_equivalent(model, PROMPTS, model.generate_ids(PROMPTS, 10), out_ids)
            # What vLLM was sent: the merged prompt, padding stripped, as vLLM reads it.
            sent = fake.state.requests[0]
            embeds = decode_embeds(sent["prompt_embeds"])
            batch = model.prepare([PROMPTS[0]])
            assert torch.equal(embeds, batch.inputs_embeds[0])
            assert sent["model"] == "exported" and sent["max_tokens"] == 10
            chat = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
            )
            assert chat.choices[0].message.content is not None
            assert httpx.get(s.url + "/health").json()["backend"] == "vllm"
    # vLLM gone: a clear 502, not a hang.
    config = ServeConfig(
        backend="vllm", vllm_url=vllm.url, vllm_model="exported", served_model_name="m"
    )
    with ServerThread(build_app(config, model), config) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="m", prompt="hi", max_tokens=2)
        assert err.value.status_code == 502 and "vLLM" in err.value.message
