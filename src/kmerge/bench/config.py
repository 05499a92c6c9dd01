"""What ``kmerge bench`` measures (BenchConfig) and on what: device, dtype, context checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kmerge.encoder import check_k
from kmerge.errors import KMergeConfigError
from kmerge.models import DEFAULT_MODEL
from kmerge.options import check_values, option


@dataclass
class BenchConfig:
    base_model: str = option(DEFAULT_MODEL, "embedded name, hub id or local dir")
    lengths: Sequence[int] = option((256, 1024, 2048, 4096), "prompt lengths in tokens")
    ks: Sequence[int] = option((1, 2, 4, 8), "K values (1 = uncompressed)")
    repeats: int = option(5, "timed rounds (medians, IQR reported)", minimum=1)
    warmup: int = option(1, "untimed rounds first", minimum=0)
    decode_tokens: int = option(32, "greedy tokens decoded after each prefill (0: skip)", minimum=0)
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1")
    dtype: str = option("auto", "auto (bfloat16 on cuda, else float32), float32, bfloat16, ...")
    merge_lora: bool = option(
        True,
        "fold LoRA into the base weights for prefill and generation, as kmerge eval and "
        "generate do (training steps always run it unmerged)",
    )
    train: bool = option(True, "time a training step per K")
    train_ks: Sequence[int] = option((1, 4), "K values of the training step")
    train_batch_size: int = option(16, "examples per timed training step", minimum=1)
    train_data_dir: str | None = option(
        None, "Amazon Reviews files (e.g. ../shared/data/amazon_reviews); default: synthetic"
    )
    train_prompt_tokens: int = option(256, "synthetic training prompts' length", minimum=1)
    train_max_prompt_tokens: int | None = option(None, "head + tail cut of longer review prompts")
    generate: bool = option(True, "time cached generate against re-running the sequence")
    generate_k: int = option(4, "K of the generation timing")
    generate_prompt_tokens: int = option(1024, "prompt length of the generation timing", minimum=1)
    generate_new_tokens: int = option(64, "tokens generated per timed generation", minimum=1)
    generate_repeats: int = option(3, "timed generations", minimum=1)
    seed: int = option(0, "seed of prompts and weights")
    output_dir: str = option("runs/bench", "bench.json and bench.png")
    command: str = option("", cli=False)  # the invocation, recorded with the results

    def __post_init__(self) -> None:
        self.lengths, self.ks, self.train_ks = (
            tuple(self.lengths),
            tuple(self.ks),
            tuple(self.train_ks),
        )
        for name in ("lengths", "ks", "train_ks"):
            if not getattr(self, name):
                raise KMergeConfigError(f"{name} needs at least one value")
        for k in (*self.ks, *self.train_ks, self.generate_k):
            check_k(k)
        check_values(self)
        if min(self.lengths) < 1:
            raise KMergeConfigError(f"prompt lengths must be >= 1 token, got {min(self.lengths)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KMergeConfigError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KMergeConfigError("--device cuda, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise KMergeConfigError(f"dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def check_context(cfg: BenchConfig, max_positions: int | None) -> None:
    """Every measured sequence must fit the model: nothing is truncated to make it."""
    if max_positions is None:
        return
    needs = [
        (n + cfg.decode_tokens, f"prompt length {n} (+ {cfg.decode_tokens} decode tokens)")
        for n in cfg.lengths
    ]
    if cfg.generate:
        n = math.ceil(cfg.generate_prompt_tokens / cfg.generate_k) + cfg.generate_new_tokens
        needs.append((n, f"generation at K={cfg.generate_k} ({n} positions)"))
    for positions, what in needs:
        if positions > max_positions:
            raise KMergeConfigError(
                f"{what} is larger than the model's context of {max_positions} positions"
            )
