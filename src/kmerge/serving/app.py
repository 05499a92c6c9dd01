"""The FastAPI app: OpenAI's completions and chat completions over a backend.

Routes validate the request (protocol.py), turn each prompt into a :class:`GenRequest`, hand
it to the backend and wait on its events: one JSON response, or server-sent events in
OpenAI's chunk format ending with ``data: [DONE]``. A streaming client that goes away marks
its requests cancelled, so the scheduler drops them at its next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kmerge.serving.backends import Backend
from kmerge.serving.config import ServeConfig
from kmerge.serving.engine import Delta, Done, Failed, GenRequest
from kmerge.serving.metrics import ServeMetrics
from kmerge.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    parse_request,
    protect_spans,
    sampling_of,
)


def create_app(backend: Backend, config: ServeConfig, metrics: ServeMetrics, model_name: str):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        yield
        # uvicorn has already let in-flight responses finish (SIGTERM drains); now the
        # backend finishes anything still queued and stops.
        await backend.aclose(config.drain_timeout_s)

    app = FastAPI(title="kmerge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend, app.state.metrics = backend, metrics
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        metrics.errors.labels(err.type).inc()
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else None
        return await api_error(request, APIError(err.status_code, str(err.detail), code=code))

    @app.middleware("http")
    async def count_and_authorise(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") and config.api_key and not _authorised(request, config):
            response = await api_error(
                request,
                APIError(
                    401,
                    "invalid or missing API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                ),
            )
        else:
            response = await call_next(request)
        if path.startswith("/v1/"):
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **backend.health()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "kmerge"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read(request, config)
        req = parse_request(body, CompletionRequest, config.max_body_bytes)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        return await _serve(req, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read(request, config)
        req = parse_request(body, ChatRequest, config.max_body_bytes)
        return await _serve(req, [_chat_prompt(backend.model.tokenizer, req)], chat=True)

    async def _serve(req, prompts: list[str], chat: bool):
        if req.model != model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {model_name!r}",
                code="model_not_found",
                param="model",
            )
        if any(not p.strip() for p in prompts):
            raise APIError(400, "every prompt needs text", param="prompt")
        sampling = sampling_of(req, config.default_max_tokens, config.max_tokens_cap)
        protect = protect_spans(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gens = [
            GenRequest(p, sampling, loop, k=req.k, index=i, protect=protect, events=events)
            for i, p in enumerate(prompts)
        ]
        submitted = []
        try:
            for g in gens:
                backend.submit(g)
                submitted.append(g)
        except APIError:
            for g in submitted:
                g.cancelled.set()
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return await _stream(req, gens, events, rid, chat)
        return await _collect(req, gens, events, rid, chat)

    async def _collect(req, gens, events, rid, chat):
        texts = {g.index: [] for g in gens}
        ids = {g.index: [] for g in gens}
        done: dict[int, Done] = {}
        try:
            while len(done) < len(gens):
                index, event = await events.get()
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Delta):
                    texts[index].append(event.text)
                    ids[index] += event.token_ids
                else:
                    done[index] = event
        finally:
            if len(done) < len(gens):  # failed or abandoned: free the others' slots
                for g in gens:
                    g.cancelled.set()
        choices = []
        for i in sorted(done):
            text = "".join(texts[i])
            choice = {"index": i, "finish_reason": done[i].finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if req.return_token_ids:
                choice["token_ids"] = ids[i]
            choices.append(choice)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": _usage(done.values()),
        }

    async def _stream(req, gens, events, rid, chat):
        # Wait for the first event before answering 200, so that a request refused by the
        # backend (prompt over the context, bad K) still gets its own status code.
        first = await events.get()
        if isinstance(first[1], Failed):
            for g in gens:
                g.cancelled.set()
            raise first[1].error
        include_usage = bool((getattr(req, "stream_options", None) or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"
        stamp = int(time.time())

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            data = {
                "id": rid,
                "object": obj,
                "created": stamp,
                "model": model_name,
                "choices": choices,
            }
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        async def sse() -> AsyncIterator[str]:
            done: dict[int, Done] = {}
            try:
                if chat:
                    yield chunk(
                        [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None,
                            }
                        ]
                    )
                pending = first
                while True:
                    index, event = pending
                    if isinstance(event, Failed):
                        yield f"data: {json.dumps(event.error.body())}\n\n"
                        break
                    if isinstance(event, Delta) and (event.text or req.return_token_ids):
                        choice = {"index": index, "finish_reason": None}
                        if chat:
                            choice["delta"] = {"content": event.text}
                        else:
                            choice.update(text=event.text, logprobs=None)
                        if req.return_token_ids:
                            choice["token_ids"] = event.token_ids
                        yield chunk([choice])
                    elif isinstance(event, Done):
                        done[index] = event
                        choice = {"index": index, "finish_reason": event.finish_reason}
                        if chat:
                            choice["delta"] = {}
                        else:
                            choice.update(text="", logprobs=None)
                        yield chunk([choice])
                        if len(done) == len(gens):
                            if include_usage:
                                yield chunk([], _usage(done.values()))
                            yield "data: [DONE]\n\n"
                            break
                    pending = await events.get()
            finally:
                if len(done) < len(gens):  # the client went away (or an error): free slots
                    for g in gens:
                        g.cancelled.set()

        return StreamingResponse(
            sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app


def _usage(done) -> dict:
    done = list(done)
    prompt = sum(d.prompt_tokens for d in done)
    completion = sum(d.completion_tokens for d in done)
    fed = sum(d.positions_fed for d in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # kmerge's own: what the model was actually fed, and at which K.
        "prompt_positions": fed,
        "compression_ratio": round(prompt / fed, 4) if fed else None,
        "k": done[0].k if done else None,
    }


def _authorised(request: Request, config: ServeConfig) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        token.strip().encode(), config.api_key.encode()
    )


async def _read(request: Request, config: ServeConfig) -> bytes:
    """The body, refused with 413 as soon as it is known to be too large."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
        raise APIError(
            413, f"request body is {declared} bytes; the limit is {config.max_body_bytes}"
        )
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > config.max_body_bytes:
            raise APIError(413, f"request body is over the limit of {config.max_body_bytes} bytes")
    return body


def _chat_prompt(tokenizer, req: ChatRequest) -> str:
    """The conversation through the base tokenizer's chat template, ending where the assistant
    answers: the whole of it is the prompt that gets merged."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "the base model's tokenizer has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja raises for conversations the template refuses
        raise APIError(
            400, f"the chat template refused these messages: {err}", param="messages"
        ) from None
