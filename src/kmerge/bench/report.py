"""``kmerge bench``'s report: markdown tables and the prefill speedup plot, from bench.json."""

from __future__ import annotations

from pathlib import Path

from kmerge.reporting import markdown_table


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.1f} ({s['q1'] * 1e3:.1f}-{s['q3'] * 1e3:.1f})"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_tables(result: dict) -> str:
    """Markdown tables: prefill per (L, K), training steps, generation."""
    header = (
        "prompt tokens", "K", "positions", "kmerge ms (IQR)", "encoder ms", "raw@positions ms",
        "speedup", "limit", "of limit", "KV MiB", "peak MiB", "decode tok/s",
    )  # fmt: skip
    prefill = []
    for r in result["prefill"]:
        peak = r["peak_memory"]["peak"]
        prefill.append(
            [
                str(r["prompt_tokens"]),
                str(r["k"]),
                str(r["positions"]),
                _ms(r["kmerge_s"]),
                f"{r['encoder_s']['median'] * 1e3:.1f}",
                _ms(r["raw_s"]),
                _x(r["speedup"]),
                _x(r["limit_speedup"]),
                _x(r["fraction_of_limit"]),
                f"{r['kv_cache_bytes'] / 2**20:.2f}",
                "-" if peak is None else f"{peak / 2**20:.0f}",
                _x(r["decode_tokens_per_s"], 1),
            ]
        )
    merged = result["settings"].get("merge_lora", False)
    lines = [
        f"prefill and generation with LoRA {'merged into' if merged else 'beside'} "
        "the base weights",
        markdown_table(header, prefill),
    ]
    if result.get("train"):
        t = result["train"]
        lines += [
            "",
            f"training step, batch {t['batch_size']} of {t['data']}:",
            markdown_table(
                (
                    "K",
                    "LM head",
                    "step ms (IQR)",
                    "examples/s",
                    "tokens/s",
                    "vs K=1",
                    "labels-only gain",
                ),
                (
                    [
                        str(r["k"]),
                        r["lm_head"],
                        _ms(r["step_s"]),
                        f"{r['examples_per_s']:.1f}",
                        f"{r['tokens_per_s']:.0f}",
                        _x(r["speedup_vs_k1"]),
                        f"{r['labels_head_gain']:.2f}",
                    ]
                    for r in t["rows"]
                ),
            ),  # fmt: skip
        ]
    if result.get("generate"):
        g = result["generate"]
        lines += [
            "",
            f"generation: {g['new_tokens']} new tokens on a {g['prompt_tokens']}-token "
            f"prompt at K={g['k']}",
            markdown_table(
                ("method", "s (IQR)", "tokens/s"),
                [
                    ["cached generate_ids", _s(g["cached_s"]), f"{g['cached_tokens_per_s']:.1f}"],
                    ["re-run per token", _s(g["rerun_s"]), f"{g['rerun_tokens_per_s']:.1f}"],
                    ["speedup", f"{g['speedup']:.1f}x", ""],
                ],
            ),
        ]
    return "\n".join(lines)


def _s(s: dict) -> str:
    return f"{s['median']:.2f} ({s['q1']:.2f}-{s['q3']:.2f})"


def plot_speedup(rows: list[dict], path: Path) -> None:
    """Prefill speedup over the uncompressed raw model vs K, one colour per prompt length:
    kmerge solid, the raw model at the compressed length (the limit) dashed, y = K dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ks = sorted({r["k"] for r in rows})
    ax.plot(ks, ks, ":", color="black", label="ideal: K")
    for i, n in enumerate(sorted({r["prompt_tokens"] for r in rows})):
        points = [r for r in rows if r["prompt_tokens"] == n and r["speedup"] is not None]
        if not points:
            continue
        x = [r["k"] for r in points]
        color = f"C{i}"
        ax.plot(x, [r["speedup"] for r in points], "o-", color=color, label=f"kmerge, L={n}")
        ax.plot(
            x,
            [r["limit_speedup"] for r in points],
            "x--",
            color=color,
            label=f"raw model at L/K, L={n}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (prompt tokens per merged position)")
    ax.set_ylabel("prefill speedup vs uncompressed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
