"""``kmerge serve`` against the official openai client, on live loopback servers.

Every server here wraps a tiny random Llama (conftest) with a non-trivial encoder and LoRA,
on a free 127.0.0.1 port in a thread (the SIGTERM test runs the real CLI in a process).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
import torch

from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.serving.config import ServeConfig
from kmerge.serving.decode import DecodeBatch
from kmerge.serving.server import ServerThread, build_app
from tests.conftest import build_tiny_base, randomise_trainables
from tests.helpers import assert_greedy_equivalent

KEY = "test-key"
NAME = "tiny"
PROMPTS = [
    "Review: the shoes fell apart after a week, Label:",
    "Tree: A is the parent of B, B is the parent of C. Who is the grandparent of C?",
    "hello",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    base = build_tiny_base(len(tokenizer), seed=0)
    m = KMergeModel.from_base(base, KMergeConfig(k=4), tokenizer=tokenizer)
    randomise_trainables(m, seed=3, std=0.05)  # a real encoder correction and LoRA update
    return m.eval()


def start(model, **overrides) -> ServerThread:
    settings = dict(
        served_model_name=NAME,
        api_key=KEY,
        max_tokens_cap=200,
        max_body_bytes=20_000,
        batch_wait_ms=20,
    )
    config = ServeConfig(**{**settings, **overrides})
    return ServerThread(build_app(config, model), config)


@pytest.fixture(scope="module")
def server(model):
    with start(model) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def extra(obj, name):
    return (obj.model_extra or {})[name]


def greedy_ids(model, prompts, n):
    return model.generate_ids(prompts, max_new_tokens=n)


# ------------------------------------------------------------------ answers
def test_completions_are_generates_greedy_answers(client, model):
    out = client.completions.create(
        model=NAME,
        prompt=PROMPTS,
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    got = [extra(c, "token_ids") for c in out.choices]
    assert_greedy_equivalent(model, PROMPTS, greedy_ids(model, PROMPTS, 12), got)
    for c, ids in zip(out.choices, got):
        assert c.text == model.tokenizer.decode(ids, skip_special_tokens=True)
        assert c.finish_reason == ("length" if len(ids) == 12 else "stop")
    usage = out.usage
    n_tokens = sum(len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    assert usage.prompt_tokens == n_tokens
    assert usage.completion_tokens == sum(len(i) for i in got)
    fed = sum(model.prepare([p]).positions_fed[0] for p in PROMPTS)
    assert extra(usage, "prompt_positions") == fed < n_tokens  # merged at K=4
    assert extra(usage, "k") == 4


def test_streamed_completion_is_the_same_text(client):
    kwargs = dict(model=NAME, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text and len(chunks) > 2
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_chat_merges_the_templated_conversation(client, model):
    messages = [{"role": "user", "content": "What is the parent of B?"}]
    prompt = model.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    out = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    ids = extra(out.choices[0], "token_ids")
    assert_greedy_equivalent(model, prompt, greedy_ids(model, [prompt], 10)[0], ids)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == model.tokenizer.decode(ids, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(
        model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sampling_settings(client):
    # ignore_eos: the stop-string checks below need 12 tokens on any CPU's greedy path.
    base = dict(model=NAME, prompt=PROMPTS[0], max_tokens=12, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **base).choices[0].text
    a = client.completions.create(temperature=1.5, seed=7, **base).choices[0].text
    b = client.completions.create(temperature=1.5, seed=7, **base).choices[0].text
    c = client.completions.create(temperature=1.5, seed=8, **base).choices[0].text
    assert a == b and a != greedy and c != a  # a random model: sampling is nearly uniform
    # A nucleus smaller than the top token's probability is the top token: greedy.
    assert client.completions.create(temperature=1.0, top_p=1e-6, **base).choices[0].text == greedy
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    cut = client.completions.create(temperature=0, stop=[stop], **base).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(temperature=0, stop=stop, stream=True, **base)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut.text


def test_k_per_request(client, model):
    out = client.completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=4, temperature=0, extra_body={"k": 2}
    )
    assert extra(out.usage, "k") == 2
    assert extra(out.usage, "prompt_positions") == model.prepare([PROMPTS[1]], k=2).positions_fed[0]
    spans = [[0, 4], [20, 40]]  # character spans kept as ordinary tokens
    kept = client.completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=4, temperature=0, extra_body={"protect": spans}
    )
    want = model.prepare([PROMPTS[1]], protect=[[(0, 4), (20, 40)]]).positions_fed[0]
    merged_only = model.prepare([PROMPTS[1]]).positions_fed[0]
    assert extra(kept.usage, "prompt_positions") == want > merged_only
    with pytest.raises(openai.BadRequestError, match="larger than the K=4"):
        client.completions.create(model=NAME, prompt="x y", max_tokens=4, extra_body={"k": 8})


# ------------------------------------------------------------------ errors
def test_openai_style_errors(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="cap of 200"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=201)
    long_prompt = "alpha beta gamma delta " * 300  # ~1,200 tokens: 300 positions > 256
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=long_prompt, max_tokens=2)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:  # fits alone, not with max_tokens
        client.completions.create(model=NAME, prompt="alpha beta gamma delta " * 70, max_tokens=200)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=NAME, prompt="x" * 30_000, max_tokens=2)
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="hi", temperature=5)
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in (b"{not json", b"[1, 2]", b'{"model": "tiny"}'):
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/nothing", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_api_key(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401  # no header at all
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_queue_limit_429_and_disconnect_frees_the_slot(model, monkeypatch):
    # Slow each decode step down so the tiny model's stream is still running when the test
    # acts (it would otherwise finish 200 tokens in a blink); ignore_eos so that no CPU's
    # greedy tokens can end it early.
    step = DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(0.03), step(self)))
    with start(model, max_queue=1, api_key=None) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0)
        scheduler = s.app.state.backend.scheduler
        body = {
            "model": NAME,
            "prompt": "hello there",
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)  # the stream is running: the one slot is taken
            with pytest.raises(openai.RateLimitError) as err:
                c.completions.create(model=NAME, prompt="hi", max_tokens=2)
            assert err.value.status_code == 429
        # The client closed mid-stream: the scheduler drops its row and frees the slot.
        deadline = time.monotonic() + 10
        while scheduler.outstanding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.outstanding == 0
        metrics = s.app.state.metrics
        assert metrics.cancelled._value.get() == 1
        assert metrics.generation_tokens._value.get() == 0  # it never finished
        assert c.completions.create(model=NAME, prompt="hi", max_tokens=2).choices


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["worker_alive"]
    client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['kmerge_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values["kmerge_prompt_tokens_total"] > values["kmerge_positions_fed_total"] > 0
    assert values["kmerge_compression_ratio"] > 1
    assert values["kmerge_time_to_first_token_seconds_count"] >= 1
    assert values["kmerge_generation_tokens_total"] >= 3
    assert any(k.startswith("kmerge_request_errors_total") for k in values)


# ------------------------------------------------------------------ load
def test_bounded_load_no_request_lost_memory_flat(model):
    """160 requests from 16 concurrent clients on loopback: all answered, RSS flat."""
    process = psutil.Process()
    with start(model, api_key=None, max_queue=64) as s:

        async def run() -> tuple[list, int, int]:
            aclient = openai.AsyncOpenAI(
                base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=60
            )

            async def one(i: int) -> int:
                prompt = PROMPTS[i % len(PROMPTS)] + f" #{i}"
                if i % 2:
                    stream = await aclient.completions.create(
                        model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True
                    )
                    return sum([1 async for ch in stream if ch.choices and ch.choices[0].text])
                out = await aclient.completions.create(
                    model=NAME, prompt=prompt, max_tokens=8, temperature=0.7, seed=i
                )
                return out.usage.completion_tokens

            async def rounds(n_rounds: int, clients: int = 16) -> list:
                results = []
                for r in range(n_rounds):
                    batch = [one(r * clients + i) for i in range(clients)]
                    results += await asyncio.wait_for(asyncio.gather(*batch), timeout=120)
                return results

            await rounds(2)  # warm up: allocator pools, caches, connections
            before = process.memory_info().rss
            results = await rounds(10)
            after = process.memory_info().rss
            await aclient.close()
            return results, before, after

        results, rss_before, rss_after = asyncio.run(run())
    assert len(results) == 160 and all(n >= 1 for n in results)
    batches = s.app.state.metrics.batch_size
    assert batches._sum.get() / max(1, sum(b.get() for b in batches._buckets)) > 1.5, (
        "concurrent requests were never batched"
    )
    assert rss_after - rss_before < 60 * 2**20, (rss_before, rss_after)


# ------------------------------------------------------------------ the real CLI, SIGTERM
def test_cli_serve_drains_on_sigterm(tmp_path, tiny_dir):
    model = KMergeModel.from_base(str(tiny_dir), KMergeConfig(k=4))
    checkpoint = model.save_pretrained(tmp_path / "ckpt")
    env = {**os.environ, "KMERGE_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "kmerge", "serve", str(checkpoint), "--port", "0",
        "--served-model-name", "m", "--drain-timeout-s", "30",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stderr.readline()
        assert "kmerge serve: http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split()[2].rsplit("/v1", 1)[0]
        headers = {"Authorization": "Bearer env-key"}  # the key came from the environment
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {
            "model": "m",
            "prompt": "count with me",
            "max_tokens": 150,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream(
            "POST", url + "/v1/completions", json=body, headers=headers, timeout=60
        ) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the answer must still complete
            rest = [first, *lines]
        data = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" or rest[-2] == "data: [DONE]"
        assert data[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shutdown_drains_a_running_stream(model, monkeypatch):
    """What SIGTERM does to uvicorn (should_exit), with each decode step slowed down so the
    stream is certainly still running when the shutdown starts."""
    step = DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (time.sleep(0.01), step(self)))
    s = start(model, api_key=None).__enter__()
    body = {"model": NAME, "prompt": "hello", "max_tokens": 60, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(lines)
            s.server.should_exit = True  # shutdown starts with ~60 steps (0.6 s) to go
            t0 = time.monotonic()
            rest = [first, *lines]
        assert time.monotonic() - t0 > 0.2  # the stream really was mid-way
        assert "data: [DONE]" in rest
        data = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert sum(len(d["choices"][0]["text"]) > 0 for d in data) >= 30
        s.thread.join(30)
        assert not s.thread.is_alive()  # and then the server stopped
        assert not s.app.state.backend.scheduler.thread.is_alive()
    finally:
        s.__exit__(None, None, None)


def test_cli_serve_bad_flags_are_one_line(tmp_path, capsys):
    from kmerge.cli import build_parser, main

    args = build_parser().parse_args(["serve", "ckpt"])
    defaults = ServeConfig(checkpoint=args.checkpoint)  # unset flags keep ServeConfig's values
    assert (defaults.host, defaults.api_key, defaults.backend) == ("127.0.0.1", None, "local")

    with pytest.raises(SystemExit) as err:
        main(["serve", str(tmp_path / "missing"), "--backend", "vllm"])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "kmerge: error: --backend vllm needs --vllm-url (vLLM's OpenAI server)"
    ]
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path / "missing")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kmerge: error: checkpoint ") and "does not exist" in line


def test_sampling_helper_respects_top_p():
    from kmerge.serving.decode import sample

    logits = torch.tensor([3.0, 2.9, -5.0, -5.0])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, 0.6, g)) for _ in range(50)}
    assert picks == {0, 1}  # the two-token nucleus only
