"""Where kmerge's prefill time goes: three arms profiled side by side in one run.

    .venv/bin/python benchmarks/profile_prefill.py --length 2048 --k 8

Arms: kmerge end to end (tokenise, embed, merge, LM forward) with the LoRA layers as trained
(``unmerged``: every adapted linear layer runs W x + B (A x)), the same with LoRA folded into
the base weights (``merged``, ``KMergeModel.merge_lora``, as ``kmerge eval`` / ``generate`` /
``bench`` run it), and the raw base model fed ceil(L/K) token ids (``raw``: the limit ``kmerge
bench`` compares with). Each arm is profiled with ``torch.profiler`` over a few prefills after
a warm-up; the script prints each arm's top operators by self CPU time, then a summary (time
per prefill, matmul calls, time in matmuls), and writes Chrome traces (chrome://tracing or
https://ui.perfetto.dev). Profiling adds overhead: use ``kmerge bench`` for speed figures.
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
from kmerge.reporting import markdown_table

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", default=DEFAULT_MODEL)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=12, help="operators listed per arm")
    p.add_argument("--output-dir", default="runs/profile")
    args = p.parse_args()

    base, tokenizer = load_base_model(args.base_model)
    raw_lm = copy.deepcopy(base)  # before LoRA is injected into the base in place
    model = build_models(base, tokenizer, [args.k])[args.k]
    prompt = [synthetic_prompt(tokenizer, args.length)]
    ids = torch.tensor(tokenize_prompts(tokenizer, prompt))[:, : math.ceil(args.length / args.k)]
    arms = {
        "kmerge, LoRA unmerged": (model.unmerge_lora, lambda: kmerge_prefill(model, prompt)),
        "kmerge, LoRA merged": (model.merge_lora, lambda: kmerge_prefill(model, prompt)),
        "raw model at L/K": (lambda: None, lambda: raw_prefill(raw_lm, ids)),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    with torch.no_grad():
        for name, (setup, prefill) in arms.items():
            setup()
            prefill()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    prefill()
            ops = prof.key_averages()
            print(f"\n=== {name}: L={args.length} K={args.k}")
            print(ops.table(sort_by="self_cpu_time_total", row_limit=args.rows))
            matmuls = [e for e in ops if e.key in MATMULS]
            per_run = args.repeats * 1e3  # profiler times are in microseconds
            summary.append(
                [
                    name,
                    f"{sum(e.self_cpu_time_total for e in ops) / per_run:.1f}",
                    str(sum(e.count for e in matmuls) // args.repeats),
                    f"{sum(e.self_cpu_time_total for e in matmuls) / per_run:.1f}",
                ]
            )
            slug = name.replace(", ", "-").replace(" ", "_").replace("/", "")
            prof.export_chrome_trace(str(out / f"{slug}-L{args.length}-K{args.k}.json"))
    header = ("arm", "ms per prefill (profiled)", "matmul calls", "ms in matmuls")
    print(f"\nL={args.length}, K={args.k}, {args.repeats} prefills per arm")
    print(markdown_table(header, summary))
    print(f"traces: {out}")


if __name__ == "__main__":
    main()
