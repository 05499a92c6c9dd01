"""ServeConfig: every setting of ``kmerge serve``, one field each (the CLI flags come from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kmerge.errors import KMergeConfigError

API_KEY_ENV = "KMERGE_API_KEY"


@dataclass
class ServeConfig:
    """What ``kmerge serve`` runs with. Each field's ``help`` becomes its flag's help text."""

    checkpoint: str = field(
        default="", metadata={"help": "kmerge checkpoint directory (what kmerge train saves)"}
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to bind; loopback by default, 0.0.0.0 exposes the server"},
    )
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    served_model_name: str | None = field(
        default=None,
        metadata={"help": "the model id clients send (default: the checkpoint's folder name)"},
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set; "
            "no key: open)"
        },
    )
    backend: str = field(
        default="local",
        metadata={"help": "local (this process runs the model) or vllm (send merged embeddings)"},
    )
    vllm_url: str | None = field(
        default=None, metadata={"help": "vLLM OpenAI server base URL, e.g. http://127.0.0.1:8001"}
    )
    vllm_model: str | None = field(
        default=None, metadata={"help": "the model id vLLM serves (default: ask its /v1/models)"}
    )
    max_batch_size: int = field(
        default=16, metadata={"help": "most requests decoded together in one batch"}
    )
    batch_wait_ms: float = field(
        default=5.0,
        metadata={"help": "how long the scheduler gathers concurrent requests into a batch"},
    )
    max_queue: int = field(
        default=64,
        metadata={"help": "most requests waiting or running; more are refused with 429"},
    )
    max_tokens_cap: int = field(
        default=512, metadata={"help": "largest max_tokens a request may ask for"}
    )
    default_max_tokens: int = field(
        default=16, metadata={"help": "max_tokens when a request gives none (OpenAI's: 16)"}
    )
    max_body_bytes: int = field(
        default=1_000_000, metadata={"help": "largest request body; larger ones get 413"}
    )
    k: int | None = field(
        default=None,
        metadata={"help": "block size to merge at (default: the checkpoint's; requests may "
                  "ask for another K up to the checkpoint's)"},
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "fold LoRA into the base weights after loading"}
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (default: torch's choice)"}
    )
    drain_timeout_s: float = field(
        default=30.0, metadata={"help": "on SIGTERM: how long in-flight requests may finish"}
    )

    def __post_init__(self) -> None:
        if self.backend not in ("local", "vllm"):
            raise KMergeConfigError(f"backend must be 'local' or 'vllm', got {self.backend!r}")
        if self.backend == "vllm" and not self.vllm_url:
            raise KMergeConfigError("--backend vllm needs --vllm-url (vLLM's OpenAI server)")
        if not 0 <= self.port <= 65535:
            raise KMergeConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch_size", "max_queue", "max_tokens_cap", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise KMergeConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_cap:
            raise KMergeConfigError(
                f"default_max_tokens must be in 1..max_tokens_cap ({self.max_tokens_cap}), "
                f"got {self.default_max_tokens}"
            )
        if self.batch_wait_ms < 0:
            raise KMergeConfigError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
