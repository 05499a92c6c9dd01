"""ServeConfig: every setting of ``kmerge serve``, one field each (the CLI flags come from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kmerge.errors import KMergeConfigError
from kmerge.options import check_values, option

API_KEY_ENV = "KMERGE_API_KEY"


@dataclass
class ServeConfig:
    """What ``kmerge serve`` runs with. Each field's ``help`` becomes its flag's help text."""

    # the CLI's positional argument
    checkpoint: str = option("", "kmerge checkpoint directory (what kmerge train saves)", cli=False)
    host: str = option(
        "127.0.0.1", "address to bind; loopback by default, 0.0.0.0 exposes the server"
    )
    port: int = option(8000, "TCP port (0: any free port)", minimum=0, maximum=65535)
    served_model_name: str | None = option(
        None, "the model id clients send (default: the checkpoint's folder name)"
    )
    api_key: str | None = option(
        None, f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set; no key: open)"
    )
    backend: Literal["local", "vllm"] = option(
        "local", "local (this process runs the model) or vllm (send merged embeddings)"
    )
    vllm_url: str | None = option(
        None, "vLLM OpenAI server base URL, e.g. http://127.0.0.1:8001", requires="backend=vllm"
    )
    vllm_model: str | None = option(
        None, "the model id vLLM serves (default: ask its /v1/models)", requires="backend=vllm"
    )
    max_batch_size: int = option(16, "most requests decoded together in one batch", minimum=1)
    batch_wait_ms: float = option(
        5.0, "how long the scheduler gathers concurrent requests into a batch", minimum=0
    )
    max_queue: int = option(
        64, "most requests waiting or running; more are refused with 429", minimum=1
    )
    max_tokens_cap: int = option(512, "largest max_tokens a request may ask for", minimum=1)
    default_max_tokens: int = option(16, "max_tokens when a request gives none (OpenAI's: 16)")
    max_body_bytes: int = option(1_000_000, "largest request body; larger ones get 413", minimum=1)
    k: int | None = option(
        None,
        "block size to merge at (default: the checkpoint's; requests may "
        "ask for another K up to the checkpoint's)",
    )
    merge_lora: bool = option(True, "fold LoRA into the base weights after loading")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    drain_timeout_s: float = option(30.0, "on SIGTERM: how long in-flight requests may finish")

    def __post_init__(self) -> None:
        check_values(self)
        if self.backend == "vllm" and not self.vllm_url:
            raise KMergeConfigError("--backend vllm needs --vllm-url (vLLM's OpenAI server)")
        if not 1 <= self.default_max_tokens <= self.max_tokens_cap:
            raise KMergeConfigError(
                f"default_max_tokens must be in 1..max_tokens_cap ({self.max_tokens_cap}), "
                f"got {self.default_max_tokens}"
            )
