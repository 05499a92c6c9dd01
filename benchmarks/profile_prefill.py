"""Where kmerge's prefill time goes, next to the raw model at the compressed length.

    .venv/bin/python benchmarks/profile_prefill.py --length 2048 --k 8
    .venv/bin/python benchmarks/profile_prefill.py --length 2048 --k 8 --merge-lora

Runs ``torch.profiler`` over a few prefills of (a) kmerge end to end (tokenise, embed, merge,
LoRA model forward) and (b) the raw base model fed ceil(L/K) token ids (the limit ``kmerge
bench`` compares with), prints the top operators of each by self CPU time and the total, and
writes Chrome traces (open them in chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kmerge.batching import tokenize_prompts
from kmerge.bench import build_models, kmerge_prefill, raw_prefill, synthetic_prompt
from kmerge.models import DEFAULT_MODEL, load_base_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default=DEFAULT_MODEL)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the base weights")
    p.add_argument("--rows", type=int, default=15, help="operators listed per arm")
    p.add_argument("--output-dir", default="runs/profile")
    args = p.parse_args()

    base, tokenizer = load_base_model(args.base_model)
    raw_lm = copy.deepcopy(base)
    model = build_models(base, tokenizer, [args.k])[args.k]
    if args.merge_lora:
        model.merge_lora()
    prompt = [synthetic_prompt(tokenizer, args.length)]
    ids = torch.tensor(tokenize_prompts(tokenizer, prompt))[:, : math.ceil(args.length / args.k)]
    arms = {
        "kmerge": lambda: kmerge_prefill(model, prompt),
        "raw": lambda: raw_prefill(raw_lm, ids),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name, fn in arms.items():
            fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                for _ in range(args.repeats):
                    fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / args.repeats
            print(f"\n=== {name}: L={args.length} K={args.k}, {total / 1e3:.1f} ms per prefill")
            print(table)
            trace = out / f"{name}-L{args.length}-K{args.k}{'-merged' * args.merge_lora}.json"
            prof.export_chrome_trace(str(trace))
            print(f"trace: {trace}")


if __name__ == "__main__":
    main()
