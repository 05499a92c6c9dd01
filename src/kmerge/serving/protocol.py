"""The OpenAI request shapes kmerge accepts, its errors, and what the engine is asked to do.

Requests are validated here, before anything is queued, so every bad request ends as one
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}`` with its status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error the client gets as OpenAI's error body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Request(BaseModel):
    # Unknown OpenAI fields (logit_bias, user, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = 1
    # kmerge's own fields (extra_body in the openai client):
    k: int | None = Field(default=None, ge=1)  # merge at this K (at most the checkpoint's)
    protect: list[list[int]] | None = None  # character spans of the prompt kept unmerged
    return_token_ids: bool = False  # add each choice's generated token ids (as vLLM does)
    ignore_eos: bool = False  # keep going past EOS up to max_tokens (as vLLM; benchmarks)


class CompletionRequest(_Request):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
        if len(parts) != len(self.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def parse_request(raw: bytes, cls: type[_Request], limit: int) -> _Request:
    """The request in ``raw``: 413 over ``limit`` bytes, 400 for bad JSON or fields."""
    if len(raw) > limit:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limit}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        request = cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}", param=where) from None
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    return request


@dataclass
class Sampling:
    """How one prompt is decoded. temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


def sampling_of(request: _Request, default_max: int, cap: int) -> Sampling:
    """The request's decoding settings, checked against the server's cap."""
    max_tokens = request.max_tokens
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
    max_tokens = default_max if max_tokens is None else max_tokens
    if max_tokens > cap:
        raise APIError(
            400, f"max_tokens={max_tokens} is over this server's cap of {cap}", param="max_tokens"
        )
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=stop,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )


def protect_spans(request: _Request) -> list[tuple[int, int]] | None:
    if request.protect is None:
        return None
    if any(len(s) != 2 or s[0] < 0 or s[1] < s[0] for s in request.protect):
        raise APIError(400, "protect takes [start, end] character spans", param="protect")
    return [(s[0], s[1]) for s in request.protect]
