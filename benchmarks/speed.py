"""Prefill, decode, memory, KV cache, training and generation speed (issue 5's settings).

    .venv/bin/python benchmarks/speed.py                    # writes runs/bench
    .venv/bin/python benchmarks/speed.py --device cuda --output-dir runs/bench-gpu

Prompt lengths 256, 1024, 2048, 4096 x K = 1, 2, 4, 8 on the embedded model; the training step
on Amazon Reviews prompts when ../shared/data/amazon_reviews exists (else synthetic ones);
64 new tokens on a 1024-token prompt. Any other ``kmerge bench`` option may follow and
overrides these (``kmerge bench --help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kmerge.cli import main

REVIEWS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "amazon_reviews"

DEFAULTS = [
    "--lengths", "256,1024,2048,4096", "--ks", "1,2,4,8", "--repeats", "5", "--warmup", "1",
    "--train-ks", "1,4", "--generate-k", "4", "--generate-prompt-tokens", "1024",
    "--generate-new-tokens", "64", "--output-dir", "runs/bench",
]  # fmt: skip

if __name__ == "__main__":
    data = ["--train-data-dir", str(REVIEWS.resolve())] if REVIEWS.is_dir() else []
    main(["bench", *DEFAULTS, *data, *sys.argv[1:]])
