"""``kmerge`` run as a real process, the way users run it: for the tests that need signals, a
kill, or several processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from kmerge.modeling import ENCODER_FILE

# One thread per process: the machine is small and the results must not depend on it.
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "0"}


def start(argv: list, log: Path, module: list | tuple = ("kmerge",)) -> subprocess.Popen:
    """Start ``python -m kmerge *argv`` (``module``: what follows ``-m`` instead of kmerge)
    with its output going to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *map(str, module), *map(str, argv)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )


def run(argv: list, log: Path, timeout: float = 300, module: list | tuple = ("kmerge",)) -> int:
    """Run ``python -m kmerge *argv`` (see ``start``) to the end; its exit status."""
    return start(argv, log, module).wait(timeout)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str) -> None:
    """Poll until ``condition`` holds; fail if the process ends first or nothing happens."""
    deadline = time.monotonic() + 180
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"kmerge ended (status {proc.returncode}) before {what}:\n"
                                 f"{log.read_text()[-3000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def records(run_dir: Path, key: str) -> list[dict]:
    """The metrics.jsonl records holding ``key``, without their wall-clock times."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [
        {k: v for k, v in r.items() if k not in ("elapsed", "train_seconds")}
        for r in rows
        if key in r
    ]


def trainable_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every trained tensor (LoRA adapter and encoder) of a saved KMergeModel."""
    adapter = load_file(model_dir / "adapter_model.safetensors")
    encoder = load_file(model_dir / ENCODER_FILE)
    return {f"adapter.{k}": v for k, v in adapter.items()} | {
        f"encoder.{k}": v for k, v in encoder.items()
    }


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = trainable_weights(a), trainable_weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 4
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
