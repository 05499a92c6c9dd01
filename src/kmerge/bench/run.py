"""``run_bench``: load the model, build one KMergeModel per K, measure, write the results."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from kmerge.bench.config import BenchConfig, check_context, resolve_device, resolve_dtype
from kmerge.bench.measure import bench_generate, bench_prefill, bench_train
from kmerge.bench.paths import build_models
from kmerge.bench.report import plot_speedup
from kmerge.io import write_json
from kmerge.modeling import KMergeModel
from kmerge.models import load_base_model
from kmerge.provenance import machine_info


def run_bench(cfg: BenchConfig, base=None, tokenizer=None) -> dict:
    """Run the benchmarks and write ``bench.json`` and ``bench.png`` under ``output_dir``;
    ``base``/``tokenizer``: an already loaded model instead of ``cfg.base_model``."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if base is None:
        base, tokenizer = load_base_model(cfg.base_model, dtype=dtype)
    base = base.to(device=device, dtype=dtype)
    check_context(cfg, getattr(base.config, "max_position_embeddings", None))
    ks = {*cfg.ks, *(cfg.train_ks if cfg.train else ()), *([cfg.generate_k] * cfg.generate)}
    raw_lm = copy.deepcopy(base)  # before from_base injects LoRA into the base in place
    models = build_models(base, tokenizer, sorted(ks))
    result = {"machine": machine_info(device, dtype), "settings": dataclasses.asdict(cfg)}
    _merge_lora(models, cfg.merge_lora)  # inference as kmerge eval / generate run it
    result["prefill"] = bench_prefill(models, raw_lm, cfg, device)
    _merge_lora(models, False)  # training needs the LoRA branch
    result["train"] = bench_train(models, cfg, device) if cfg.train else None
    _merge_lora(models, cfg.merge_lora)
    result["generate"] = (
        bench_generate(models[cfg.generate_k], cfg, device) if cfg.generate else None
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", result)
    plot_speedup(result["prefill"], out / "bench.png")
    return result


def _merge_lora(models: dict[int, KMergeModel], merged: bool) -> None:
    for model in models.values():
        if merged:
            model.merge_lora()
        else:
            model.unmerge_lora()
