"""``kmerge serve``: an OpenAI-compatible HTTP server for kmerge checkpoints.

config.py (ServeConfig, every flag), protocol.py (requests, errors), app.py (routes),
scheduler.py + decode.py (the local backend's batching and step-wise decoding),
backends/ (local, vllm), metrics.py (Prometheus), server.py (uvicorn), cli.py (flags).
Needs the ``serve`` extra: ``pip install 'kmerge[serve]'``.
"""

from kmerge.serving.config import ServeConfig

__all__ = ["ServeConfig"]
