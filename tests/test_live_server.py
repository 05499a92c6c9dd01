"""The client tests against an already running ``kmerge serve`` (any backend), for
``make vllm-check``: skipped unless KMERGE_LIVE_URL names the server. KMERGE_LIVE_CHECKPOINT
(the checkpoint it serves) is loaded here to compare greedy answers with ``generate``."""

from __future__ import annotations

import os

import openai
import pytest

from kmerge.modeling import KMergeModel
from tests.helpers import assert_greedy_equivalent

URL = os.environ.get("KMERGE_LIVE_URL")
MODEL = os.environ.get("KMERGE_LIVE_MODEL", "")
pytestmark = pytest.mark.skipif(not URL, reason="KMERGE_LIVE_URL not set (make vllm-check)")
PROMPTS = [
    "The capital of France is Paris. The capital of Italy is",
    "Review: the shoes fell apart after a week. Was the review positive or negative? Answer:",
]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(
        base_url=URL + "/v1",
        api_key=os.environ.get("KMERGE_API_KEY", "-"),
        max_retries=0,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model():
    return KMergeModel.from_pretrained(os.environ["KMERGE_LIVE_CHECKPOINT"]).eval()


def test_live_completion_matches_generate(client, model):
    for prompt in PROMPTS:
        out = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        choice = out.choices[0]
        want = model.generate_ids([prompt], 12)[0]
        ids = (choice.model_extra or {}).get("token_ids")
        assert ids, "the server returned no token ids (vLLM relays them with return_token_ids)"
        assert_greedy_equivalent(model, prompt, want, ids)
        assert choice.text == model.tokenizer.decode(ids, skip_special_tokens=True)
        assert out.usage.model_extra["prompt_positions"] == model.prepare([prompt]).positions_fed[0]


def test_live_stream_and_chat(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = client.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content


def test_live_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
