"""Load a checkpoint and run the app under uvicorn, in the foreground or in a thread (tests).

uvicorn turns SIGTERM/SIGINT into a graceful shutdown: it stops accepting connections, lets
in-flight responses finish (up to ``drain_timeout_s``), then the app's lifespan stops the
backend, which finishes anything still queued.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from kmerge.serving.app import create_app
from kmerge.serving.backends import make_backend
from kmerge.serving.config import API_KEY_ENV, ServeConfig
from kmerge.serving.metrics import ServeMetrics


def build_app(config: ServeConfig, model=None):
    """The app for ``config``; ``model`` (a KMergeModel) skips loading the checkpoint."""
    if config.api_key is None:
        config.api_key = os.environ.get(API_KEY_ENV) or None
    if model is None:
        from kmerge.modeling import KMergeModel

        model = KMergeModel.from_pretrained(config.checkpoint)
        if config.merge_lora and config.backend == "local":
            model.merge_lora()
    model.eval()
    if config.k is not None:
        model.config.k = model.resolve_k(config.k)  # the default K requests merge at
    name = config.served_model_name or Path(config.checkpoint.rstrip("/")).name or "kmerge"
    metrics = ServeMetrics()
    return create_app(make_backend(model, config, metrics), config, metrics, name)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the real port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die of the
    signal; a drained shutdown is a normal exit (status 0)."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _uvicorn(app, config: ServeConfig) -> uvicorn.Server:
    return _Server(
        uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=int(config.drain_timeout_s) or None,
            lifespan="on",
        )
    )


def serve(config: ServeConfig, model=None) -> None:
    """Serve in the foreground until SIGTERM/SIGINT."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    app = build_app(config, model)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    auth = "API key required" if config.api_key else "no API key"
    print(
        f"kmerge serve: http://{host}:{port}/v1 ({config.backend} backend, {auth})",
        file=sys.stderr,
        flush=True,
    )
    _uvicorn(app, config).run(sockets=[sock])


class ServerThread:
    """The app served on a free loopback port in a background thread (tests, benchmarks)."""

    def __init__(self, app, config: ServeConfig) -> None:
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _uvicorn(app, config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
