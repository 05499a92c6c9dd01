"""Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kmerge_requests",
            "requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "kmerge_request_errors",
            "requests refused or failed, by error type",
            ["type"],
            registry=r,
        )
        self.cancelled = Counter(
            "kmerge_requests_cancelled",
            "requests dropped because their client went away",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kmerge_prompt_tokens", "prompt tokens before merging", registry=r
        )
        self.positions_fed = Counter(
            "kmerge_positions_fed", "prompt positions fed to the model after merging", registry=r
        )
        self.generation_tokens = Counter("kmerge_generation_tokens", "tokens generated", registry=r)
        self.compression = Gauge(
            "kmerge_compression_ratio",
            "prompt tokens / positions fed, over all requests",
            registry=r,
        )
        self.ttft = Histogram(
            "kmerge_time_to_first_token_seconds",
            "from arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "kmerge_request_seconds",
            "from arrival to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "kmerge_tokens_per_second",
            "generated tokens per second of each request (after its first token)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.queued = Gauge("kmerge_requests_waiting", "requests waiting for a batch", registry=r)
        self.running = Gauge("kmerge_requests_running", "requests in the running batch", registry=r)
        self.batch_size = Histogram(
            "kmerge_batch_size",
            "requests per prefilled batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )

    def record_prompt(self, prompt_tokens: int, positions_fed: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.positions_fed.inc(positions_fed)
        fed = self.positions_fed._value.get()
        self.compression.set(self.prompt_tokens._value.get() / fed if fed else 0.0)

    def record_finish(
        self, created: float, first_token_at: float | None, end: float, tokens: int
    ) -> None:
        self.generation_tokens.inc(tokens)
        self.latency.observe(end - created)
        if first_token_at is not None:
            self.ttft.observe(first_token_at - created)
            if tokens > 1 and end > first_token_at:
                self.tokens_per_second.observe((tokens - 1) / (end - first_token_at))

    def render(self) -> bytes:
        return generate_latest(self.registry)
