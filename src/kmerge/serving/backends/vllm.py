"""The vLLM backend: kmerge merges the prompt, vLLM decodes it.

vLLM's OpenAI server (``vllm serve MODEL --enable-prompt-embeds``) takes a prompt as
embeddings in ``/v1/completions``: ``prompt_embeds`` is a base64 string of a ``torch.save``d
tensor ``[positions, hidden]``. Each request is merged here (``KMergeModel.prepare``, padding
stripped) and sent on its own; vLLM batches them (continuous batching). vLLM must serve the
folder ``kmerge export`` wrote, so its weights are the checkpoint's with LoRA folded in.
The answer is always streamed from vLLM and relayed (or gathered for a non-streaming client).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import torch

from kmerge.errors import KMergeError
from kmerge.serving.engine import Delta, Done, Failed, GenRequest
from kmerge.serving.protocol import APIError


def encode_embeds(embeds: torch.Tensor) -> str:
    """``embeds`` as vLLM reads ``prompt_embeds``: base64 of ``torch.save`` bytes."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_embeds(text: str) -> torch.Tensor:
    """The inverse of :func:`encode_embeds` (what a vLLM-like server does with the field)."""
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


class VLLMBackend:
    def __init__(self, model, config, metrics) -> None:
        self.model = model
        self.metrics = metrics
        self.url = config.vllm_url.rstrip("/")
        self.served = config.vllm_model
        self.max_queue = config.max_queue
        self.client: httpx.AsyncClient | None = None
        self.tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(600, connect=10))

    def submit(self, request: GenRequest) -> None:
        if len(self.tasks) >= self.max_queue:
            raise APIError(
                429,
                f"server busy: {len(self.tasks)} requests in flight (limit {self.max_queue})",
                type="rate_limit_error",
            )
        task = asyncio.ensure_future(self._run(request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        if self.client is not None:
            await self.client.aclose()

    def health(self) -> dict:
        return {"backend": "vllm", "vllm_url": self.url, "in_flight": len(self.tasks)}

    async def _model_id(self) -> str:
        if self.served is None:
            response = await self.client.get("/v1/models")
            response.raise_for_status()
            self.served = response.json()["data"][0]["id"]
        return self.served

    def _merge(self, request: GenRequest) -> tuple[torch.Tensor, int, int, int]:
        k = self.model.resolve_k(request.k)
        protect = [list(request.protect)] if request.protect else None
        with torch.inference_mode():
            batch = self.model.prepare([request.prompt], k=k, protect=protect)
        real = batch.attention_mask[0].bool()
        return batch.inputs_embeds[0][real], batch.prompt_tokens[0], batch.positions_fed[0], k

    async def _run(self, request: GenRequest) -> None:
        try:
            try:
                embeds, n_tokens, n_fed, k = await asyncio.to_thread(self._merge, request)
            except KMergeError as err:
                raise APIError(400, str(err)) from None
            self.metrics.record_prompt(n_tokens, n_fed)
            s = request.sampling
            body = {
                "model": await self._model_id(),
                "prompt_embeds": encode_embeds(embeds),
                "max_tokens": s.max_tokens,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "stream": True,
                "stream_options": {"include_usage": True},
                "return_token_ids": True,  # relayed to clients that ask for token_ids
            }
            if s.stop:
                body["stop"] = s.stop
            if s.ignore_eos:
                body["ignore_eos"] = True
            if s.seed is not None:
                body["seed"] = s.seed
            reason, completion_tokens = await self._relay(request, body)
            request.emit(Done(reason, n_tokens, n_fed, completion_tokens, k))
            self.metrics.record_finish(
                request.created, request.first_token_at, time.perf_counter(), completion_tokens
            )
        except APIError as err:
            request.emit(Failed(err))
        except (httpx.HTTPError, ValueError, KeyError) as err:
            request.emit(Failed(APIError(502, f"vLLM at {self.url} failed: {err}", "server_error")))

    async def _relay(self, request: GenRequest, body: dict) -> tuple[str, int]:
        reason, tokens = "length", 0
        async with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text[:500]
                status = response.status_code if response.status_code < 500 else 502
                raise APIError(
                    status,
                    f"vLLM: {message}",
                    "invalid_request_error" if status < 500 else "server_error",
                )
            async for line in response.aiter_lines():
                if request.cancelled.is_set():
                    break  # closing the stream tells vLLM to abort the request
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
                for choice in chunk.get("choices") or []:
                    if choice.get("text") or choice.get("token_ids"):
                        request.emit(Delta(choice.get("text", ""), choice.get("token_ids") or []))
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
        return reason, tokens
