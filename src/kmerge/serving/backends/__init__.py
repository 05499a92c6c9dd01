"""Backends: where the merged prompt is decoded. ``local`` runs the model in this process;
``vllm`` sends the merged embeddings to a vLLM server (``--enable-prompt-embeds``)."""

from __future__ import annotations

from typing import Protocol

from kmerge.serving.engine import GenRequest


class Backend(Protocol):
    """What the routes need from a backend."""

    model: object  # the KMergeModel: tokenizer, chat template, resolve_k, context

    def start(self) -> None: ...

    def submit(self, request: GenRequest) -> None:
        """Take ``request`` (events go to its queue) or raise APIError (e.g. 429)."""

    async def aclose(self, timeout: float) -> None:
        """Finish in-flight work (at most ``timeout`` seconds) and release resources."""

    def health(self) -> dict: ...


def make_backend(model, config, metrics) -> Backend:
    if config.backend == "vllm":
        from kmerge.serving.backends.vllm import VLLMBackend

        return VLLMBackend(model, config, metrics)
    from kmerge.serving.backends.local import LocalBackend

    return LocalBackend(model, config, metrics)
