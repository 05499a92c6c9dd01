"""Load on `kmerge serve`: K=1 against K=4, 1/4/16 concurrent clients, batching on and off.

    .venv/bin/python benchmarks/serve_load.py --output-dir runs/serve_load

One server process (`kmerge serve`, local backend) serves an untrained K=4 model built on the
embedded SmolLM2-135M (KMergeModel.from_base; speed does not depend on training). Each request
asks for K per request (`extra_body={"k": ...}`): K=1 feeds every prompt token unmerged, the
uncompressed model, so K=1 and K=4 run on the same server and weights, side by side. Prompts
are ~1,000 tokens of distinct text each; every request streams exactly --max-tokens tokens
(ignore_eos). Clients are closed loops (each sends its next request when the last ends).
A second server with --max-batch-size 1 gives one-at-a-time at 16 clients. Loopback only.
Writes serve_load.json (+ serve_load.png) in --output-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai

WORDS = (
    "tree node parent child root leaf branch value key order level depth path edge "
    "left right first last count sum list name label review product quality price "
    "delivery colour size fits great poor broken return again small large"
).split()


def make_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words = []
    while True:
        words += [rng.choice(WORDS) for _ in range(64)]
        text = f"Request {seed}. " + " ".join(words)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text


def start_server(checkpoint: Path, max_batch: int, threads: int, log: Path):
    """`kmerge serve` in its own process; returns it and its base URL (.../v1)."""
    cmd = [
        sys.executable, "-m", "kmerge", "serve", str(checkpoint), "--port", "0",
        "--served-model-name", "bench", "--max-batch-size", str(max_batch), "--max-queue", "256",
        "--max-tokens-cap", "512", "--threads", str(threads),
    ]  # fmt: skip
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        lines = [x for x in log.read_text().splitlines() if "kmerge serve: http://" in x]
        if lines:
            return proc, lines[0].split()[2]
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


async def one_request(client, prompt: str, k: int, max_tokens: int, model: str) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"k": k, "ignore_eos": True, "return_token_ids": True},
    )
    async for chunk in stream:
        for choice in chunk.choices:
            ids = (choice.model_extra or {}).get("token_ids") or []
            if ids and first is None:
                first = time.perf_counter() - t0
            tokens += len(ids)
    return {"ttft": first, "latency": time.perf_counter() - t0, "tokens": tokens}


async def run_point(
    url: str, prompts: list[str], k: int, clients: int, max_tokens: int, model: str = "bench"
) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
    todo = list(prompts)
    results: list[dict] = []

    async def worker() -> None:
        while todo:
            results.append(await one_request(client, todo.pop(), k, max_tokens, model))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "k": k,
        "clients": clients,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "req_per_s": round(len(results) / wall, 4),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p99_s": round(_quantile(ttfts, 0.99), 3),
        "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
        "output_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
        "failed": sum(r["tokens"] != max_tokens for r in results),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile (with few samples p99 is the slowest request)."""
    rank = math.ceil(q * len(sorted_values))  # the smallest value with >= q of them at or below
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/serve_load")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--ks", default="1,4")
    ap.add_argument("--min-requests", type=int, default=4, help="per point, at least")
    ap.add_argument("--threads", type=int, default=2, help="server torch threads")
    ap.add_argument("--batch-compare-ks", default="4", help="K values for batched vs 1-at-a-time")
    ap.add_argument(
        "--url",
        default=None,
        help="measure this running server (.../v1) instead, "
        "e.g. kmerge serve --backend vllm; batched points only",
    )
    ap.add_argument("--model", default="bench", help="with --url: its served model name")
    ap.add_argument("--checkpoint", default=None, help="with --url: the checkpoint it serves")
    args = ap.parse_args()
    from kmerge import KMergeConfig, KMergeModel

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out / "ckpt-untrained-k4"
    if not checkpoint.is_dir():
        KMergeModel.from_base("smollm2-135m", KMergeConfig(k=4)).save_pretrained(checkpoint)
    tokenizer = KMergeModel.from_pretrained(checkpoint).tokenizer
    clients = [int(c) for c in args.clients.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    prompts = [make_prompt(tokenizer, args.prompt_tokens, s) for s in range(200)]
    prompt_tokens = statistics.mean(
        len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts
    )
    counter = iter(range(10**6))

    def fresh(n: int) -> list[str]:  # distinct prompts for every request
        return [prompts[next(counter) % len(prompts)] for _ in range(n)]

    points, t_start = [], time.perf_counter()
    passes = [("batched", 16, clients, ks)]
    if args.url:
        passes = [("external", 0, clients, ks)]
    else:
        compare = [int(k) for k in args.batch_compare_ks.split(",")]
        passes.append(("one_at_a_time", 1, [max(clients)], compare))
    for label, max_batch, cs, point_ks in passes:
        if args.url:
            proc, url = None, args.url
        else:
            proc, url = start_server(checkpoint, max_batch, args.threads, out / f"{label}.log")
        try:
            for k in point_ks:  # warm-up: one request per K, not measured
                asyncio.run(run_point(url, fresh(1), k, 1, 4, args.model))
            for c in cs:
                for k in point_ks:  # K=1 and K=4 alternate at each concurrency: side by side
                    n = max(c, args.min_requests)
                    point = asyncio.run(run_point(url, fresh(n), k, c, args.max_tokens, args.model))
                    point["scheduling"] = label
                    points.append(point)
                    print(json.dumps(point), flush=True)
        finally:
            if proc is not None:
                stop_server(proc)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "prompt_tokens_mean": round(prompt_tokens, 1),
        "max_tokens": args.max_tokens,
        "server_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "total_s": round(time.perf_counter() - t_start, 1),
        "points": points,
        "goals": goals(points, clients, ks),
    }
    (out / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(points, out / "serve_load.png")
    print(json.dumps(result["goals"], indent=2))


def goals(points: list[dict], clients: list[int], ks: list[int]) -> dict:
    def get(label, k, c):
        return next(
            (p for p in points if p["scheduling"] == label and p["k"] == k and p["clients"] == c),
            None,
        )

    out = {}
    main_label = points[0]["scheduling"]
    if 1 in ks and 4 in ks:
        for c in clients:
            a, b = get(main_label, 1, c), get(main_label, 4, c)
            out[f"ttft_p50_k1_over_k4_at_{c}"] = round(a["ttft_p50_s"] / b["ttft_p50_s"], 2)
    top = max(clients)
    for k in ks:
        a, b = get("batched", k, top), get("one_at_a_time", k, top)
        if a and b:
            out[f"batching_throughput_gain_k{k}_at_{top}"] = round(
                a["output_tokens_per_s"] / b["output_tokens_per_s"], 2
            )
    return out


def plot(points: list[dict], path: Path) -> None:
    """TTFT and output tokens/s against clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, k in enumerate(sorted({p["k"] for p in points})):
        color = f"C{i}"
        rows = [p for p in points if p["k"] == k and p["scheduling"] != "one_at_a_time"]
        cs = [p["clients"] for p in rows]
        axes[0].plot(cs, [p["ttft_p50_s"] for p in rows], "o-", color=color, label=f"K={k}")
        axes[1].plot(
            cs, [p["output_tokens_per_s"] for p in rows], "o-", color=color, label=f"K={k}, batched"
        )
        for p in points:
            if p["k"] == k and p["scheduling"] == "one_at_a_time":
                axes[1].plot(
                    [p["clients"]],
                    [p["output_tokens_per_s"]],
                    "x",
                    ms=10,
                    color=color,
                    label=f"K={k}, one at a time",
                )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="p50 time to first token (s)",
    )
    axes[1].set(xscale="log", xlabel="concurrent clients", ylabel="output tokens / s")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
