"""bf16 training on the CPU: what it buys, measured side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bf16_cpu.py --steps 12

Two parts. (1) The attention kernel at the training shapes of the tree task (batch 32, a K=4
prompt of ~12 positions, the embedded model's heads): forward + backward of PyTorch's SDPA and
of the eager kernel (matmul, softmax in fp32, matmul), fp32 and bf16. On this machine SDPA's
CPU backward is several times slower in bf16 than in fp32, which is why ``kmerge train
--mixed-precision bf16`` switches a CPU run to the eager kernel. (2) The measured recipe
(``--k 4 --block-alignment segments --teacher base --encoder-lr 3e-3``) trained for a few
steps with ``--mixed-precision no`` and ``bf16``, one ``kmerge train`` process each, one after
the other: optimisation seconds per step (evaluation excluded) and the first step's loss.
A CPU without native bf16 (AVX512-BF16 or AMX) emulates it: there bf16 may well be slower.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kmerge.models import DEFAULT_MODEL
from kmerge.reporting import markdown_table

RECIPE = ["--stage", "small", "--k", "4", "--block-alignment", "segments", "--teacher", "base",
          "--encoder-lr", "3e-3", "--n-eval", "8", "--save-every", "0",
          "--log-every", "1"]  # fmt: skip


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as transformers' eager kernel computes it: softmax in fp32."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
    weights = torch.softmax(scores.masked_fill(causal, float("-inf")).float(), dim=-1)
    return weights.to(q.dtype) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_attention(kernel: Callable, dtype: torch.dtype, shape: tuple, repeats: int) -> float:
    """Mean seconds of one forward + backward."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    for _ in range(3):  # warm-up
        kernel(q, k, v).sum().backward()
    started = time.perf_counter()
    for _ in range(repeats):
        kernel(q, k, v).sum().backward()
    return (time.perf_counter() - started) / repeats


def attention_table(shape: tuple, repeats: int) -> str:
    rows, fp32 = [], {}
    for name, kernel in (("sdpa", sdpa_attention), ("eager", eager_attention)):
        for dtype in (torch.float32, torch.bfloat16):
            seconds = time_attention(kernel, dtype, shape, repeats)
            fp32.setdefault(name, seconds)
            rows.append([name, str(dtype).removeprefix("torch."), f"{seconds * 1e3:.2f}",
                         f"{seconds / fp32[name]:.2f}x"])  # fmt: skip
    return markdown_table(["kernel", "dtype", "ms fwd+bwd", "vs fp32"], rows)


def train_steps(precision: str, steps: int, base_model: str) -> dict:
    """One ``kmerge train`` process of the recipe; its seconds per step and first loss."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / precision
        argv = ["train", *RECIPE, "--steps", steps, "--eval-every", steps + 1, "--base-model",
                base_model, "--mixed-precision", precision, "--output-dir", out]  # fmt: skip
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "kmerge", *map(str, argv)], env=env,
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"kmerge train --mixed-precision {precision} failed:\n"
                             f"{done.stderr[-3000:]}")  # fmt: skip
        result = json.loads((out / "results.json").read_text())
        rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        first = next(r for r in rows if "loss" in r)
    return {"per_step": result["train_seconds"] / result["steps"], "first_loss": first["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=12, help="training steps per precision")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--positions", type=int, default=12, help="attention length (K=4 tree)")
    p.add_argument("--heads", type=int, default=9, help="the embedded SmolLM2-135M's")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n")  # fmt: skip
    shape = (args.batch, args.heads, args.positions, args.head_dim)
    print(attention_table(shape, args.repeats), "\n")
    runs = {
        precision: train_steps(precision, args.steps, args.base_model)
        for precision in ("no", "bf16")
    }
    rows = [[precision, f"{r['per_step']:.2f}", f"{runs['no']['per_step'] / r['per_step']:.2f}x",
             f"{r['first_loss']:.4f}"] for precision, r in runs.items()]  # fmt: skip
    print(markdown_table(["mixed precision", "s/step", "speed-up", "first step's loss"], rows))


if __name__ == "__main__":
    main()
