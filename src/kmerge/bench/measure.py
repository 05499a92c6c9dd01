"""The three measurements of ``kmerge bench``: prefill (with decode, KV cache, memory),
training steps, cached vs re-run generation. Each returns plain records for the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from kmerge.batching import IGNORE_INDEX
from kmerge.bench.clock import interleaved, peak_memory, spread
from kmerge.bench.config import BenchConfig
from kmerge.bench.paths import (
    cached_generate,
    decode,
    full_logits_loss,
    kmerge_prefill,
    kv_cache_bytes,
    raw_prefill,
    rerun_generate,
    synthetic_prompt,
    token_ids,
)
from kmerge.modeling import KMergeModel


def bench_prefill(models: dict[int, KMergeModel], raw_lm, cfg: BenchConfig, device) -> list[dict]:
    """Prefill, decode, KV cache and memory for every (L, K); see the module docstring."""
    tokenizer = next(iter(models.values())).tokenizer
    prompts = {n: synthetic_prompt(tokenizer, n, cfg.seed) for n in cfg.lengths}
    ids = {n: torch.tensor([token_ids(tokenizer, p)], device=device) for n, p in prompts.items()}
    arms: dict[str, Callable[[], object]] = {}
    for n in cfg.lengths:
        for k in cfg.ks:
            m, p, fed = models[k], [prompts[n]], math.ceil(n / k)
            arms[f"kmerge/{n}/{k}"] = lambda m=m, p=p: kmerge_prefill(m, p)
            arms[f"encoder/{n}/{k}"] = lambda m=m, p=p: m.prepare(p)
            arms[f"raw/{n}/{k}"] = lambda x=ids[n][:, :fed]: raw_prefill(raw_lm, x)
            if cfg.decode_tokens:
                arms[f"decode/{n}/{k}"] = lambda m=m, p=p: decode(m, p, cfg.decode_tokens)
    with torch.no_grad():
        times = interleaved(arms, cfg.repeats, cfg.warmup, device, cfg.seed, "prefill")
        rows = [
            _prefill_row(models[k], raw_lm, prompts[n], ids[n], k, times, cfg, device)
            for n in cfg.lengths
            for k in cfg.ks
        ]
    return rows


def _prefill_row(model, raw_lm, prompt, ids, k, times, cfg, device) -> dict:
    n = ids.shape[1]
    fed = math.ceil(n / k)
    t = {arm: spread(times[f"{arm}/{n}/{k}"]) for arm in ("kmerge", "encoder", "raw")}
    uncompressed = statistics.median(times[f"raw/{n}/1"]) if 1 in cfg.ks else None
    kmerge_s, raw_s = t["kmerge"]["median"], t["raw"]["median"]
    row = {
        "prompt_tokens": n,
        "k": k,
        "positions": fed,
        "kmerge_s": t["kmerge"],
        "encoder_s": t["encoder"],
        "raw_s": t["raw"],
        "encoder_share": t["encoder"]["median"] / kmerge_s,
        "overhead_vs_raw": kmerge_s / raw_s - 1,  # kmerge's cost above the raw model's limit
        "speedup": uncompressed / kmerge_s if uncompressed else None,
        "limit_speedup": uncompressed / raw_s if uncompressed else None,
        "fraction_of_limit": raw_s / kmerge_s,
        "kv_cache_bytes": kv_cache_bytes(kmerge_prefill(model, [prompt])[1]),
        "kv_cache_bytes_uncompressed": kv_cache_bytes(raw_prefill(raw_lm, ids)[1]),
        "peak_memory": peak_memory(lambda: kmerge_prefill(model, [prompt]), device),
        "peak_memory_raw": peak_memory(lambda: raw_prefill(raw_lm, ids[:, :fed]), device),
        "decode_tokens_per_s": None,
    }
    if cfg.decode_tokens:
        # The decode arm includes its own prefill: subtract the kmerge prefill's median.
        decode_s = statistics.median(times[f"decode/{n}/{k}"]) - kmerge_s
        row["decode_tokens_per_s"] = (cfg.decode_tokens - 1) / decode_s if decode_s > 0 else None
    return row


def training_prompts(cfg: BenchConfig, tokenizer) -> tuple[list[str], list[str], str]:
    """The same batch for every K: Amazon Reviews training prompts when a data directory is
    given, else synthetic prompts with a one-word answer."""
    n = cfg.train_batch_size
    if cfg.train_data_dir is None:
        prompts = [
            synthetic_prompt(tokenizer, cfg.train_prompt_tokens, cfg.seed + i) for i in range(n)
        ]
        return prompts, ["positive"] * n, f"synthetic {cfg.train_prompt_tokens}-token prompts"
    from kmerge.tasks import get_task
    from kmerge.tasks.base import fit_prompts

    task = get_task("amazon_reviews", data_dir=cfg.train_data_dir, seed=cfg.seed)
    examples, _ = fit_prompts(task.examples("train", n), tokenizer, cfg.train_max_prompt_tokens)
    return [e.prompt for e in examples], [e.answer for e in examples], "amazon_reviews"


def train_step(model: KMergeModel, optimizer, prompts, answers, full_logits: bool) -> None:
    """One optimizer step: prepare, forward, backward, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    batch = model.prepare(prompts, answers)
    loss = full_logits_loss(model, batch) if full_logits else model.loss(batch).loss
    loss.backward()
    optimizer.step()


def bench_train(models: dict[int, KMergeModel], cfg: BenchConfig, device) -> dict:
    """Examples/s and tokens/s of a training step per K, LM head at labels only vs everywhere."""
    tokenizer = next(iter(models.values())).tokenizer
    prompts, answers, source = training_prompts(cfg, tokenizer)
    arms, tokens = {}, {}
    for k in cfg.train_ks:
        model = models[k].train()
        # lr 0: the steps cost the same, and the weights stay as they were for generation.
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.0)
        batch = model.prepare(prompts, answers)
        tokens[k] = sum(batch.prompt_tokens) + int((batch.labels != IGNORE_INDEX).sum())
        for head in ("labels", "full"):
            arms[f"{k}/{head}"] = lambda m=model, o=optimizer, f=head == "full": train_step(
                m, o, prompts, answers, f
            )
    try:
        times = interleaved(arms, cfg.repeats, cfg.warmup, device, cfg.seed, "train")
    finally:
        for model in models.values():
            model.eval()
    median = {name: statistics.median(samples) for name, samples in times.items()}
    rows = []
    for name, samples in times.items():
        k, head = name.split("/")
        s = spread(samples)
        rows.append(
            {
                "k": int(k),
                "lm_head": head,
                "step_s": s,
                "examples_per_s": len(prompts) / s["median"],
                "tokens_per_s": tokens[int(k)] / s["median"],  # prompt + answer tokens covered
                "speedup_vs_k1": median[f"1/{head}"] / s["median"] if 1 in cfg.train_ks else None,
                "labels_head_gain": median[f"{k}/full"] / median[f"{k}/labels"],
            }
        )
    return {"data": source, "batch_size": len(prompts), "rows": rows}


def bench_generate(model: KMergeModel, cfg: BenchConfig, device) -> dict:
    """Cached ``generate_ids`` vs re-running the whole sequence per token, same tokens."""
    prompt = [synthetic_prompt(model.tokenizer, cfg.generate_prompt_tokens, cfg.seed)]
    n = cfg.generate_new_tokens
    arms = {
        "cached": lambda: cached_generate(model, prompt, n),
        "rerun": lambda: rerun_generate(model, prompt, n),
    }
    with torch.no_grad():
        times = interleaved(
            arms, cfg.generate_repeats, min(cfg.warmup, 1), device, cfg.seed, "generate"
        )
    cached, rerun = spread(times["cached"]), spread(times["rerun"])
    return {
        "k": model.k,
        "prompt_tokens": cfg.generate_prompt_tokens,
        "new_tokens": n,
        "cached_s": cached,
        "rerun_s": rerun,
        "cached_tokens_per_s": n / cached["median"],
        "rerun_tokens_per_s": n / rerun["median"],
        "speedup": rerun["median"] / cached["median"],
    }
