"""``kmerge bench``: how much cheaper K-Token Merging makes a prompt, measured side by side.

Four measurements, all on one base model whose LoRA is shared by one KMergeModel per K:

* **Prefill** (time to first token) for prompt lengths L x K. Each (L, K) point times, in
  rotating order within every repetition: kmerge end to end (``prepare``: tokenise, embed,
  merge; then the LM forward on the compressed batch up to the first greedy token), the encoder
  alone (``prepare``), and an untouched copy of the raw base model fed the first ceil(L/K)
  token ids of the same prompt: the limit kmerge can approach. By default the LoRA update is
  folded into the base weights for prefill and generation (``KMergeModel.merge_lora``), as
  ``kmerge eval`` and ``generate`` run it. The raw model at K = 1 is the
  uncompressed baseline every speedup is relative to. Also per point: greedy decode tokens/s
  (continuing from the prefill's KV cache), the prompt's KV-cache bytes, and peak memory
  (RSS on a CPU, sampled in a separate untimed pass; allocated memory on a GPU).
* **Training**: one optimizer step (prepare, forward, backward, AdamW) at each training K on
  the same batch, with the LM head only at label positions (``KMergeModel.loss``) and, for
  reference, on every position (:func:`full_logits_loss`).
* **Generation**: cached ``generate_ids`` vs :func:`rerun_generate`, a plain loop that re-runs
  the whole sequence for each new token (how the method's research code evaluates).

Speed is measured, never asserted: tests check that the paths do equal work (same tokens,
same loss, exact KV-cache sizes), ``docs/performance.md`` holds the numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kmerge.batching import IGNORE_INDEX, CompressedBatch, tokenize_prompts
from kmerge.encoder import check_k
from kmerge.errors import KMergeConfigError
from kmerge.io import write_json
from kmerge.modeling import KMergeConfig, KMergeModel
from kmerge.models import DEFAULT_MODEL, load_base_model
from kmerge.provenance import machine_info
from kmerge.reporting import markdown_table

# Common English words; each is one token with its leading space in byte-level BPE vocabularies
# (synthetic_prompt keeps only those that are, and checks the total).
WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which be "
    "this had not but have they one their all been has more who can its time after first also "
    "new would about other into two only them when some over years there made city state"
).split()


@dataclass
class BenchConfig:
    base_model: str = DEFAULT_MODEL
    lengths: Sequence[int] = (256, 1024, 2048, 4096)
    ks: Sequence[int] = (1, 2, 4, 8)
    repeats: int = 5
    warmup: int = 1
    decode_tokens: int = 32  # greedy tokens decoded after each kmerge prefill (0: skip)
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    merge_lora: bool = True  # LoRA folded into the base weights for prefill and generation
    train: bool = True
    train_ks: Sequence[int] = (1, 4)
    train_batch_size: int = 16
    train_data_dir: str | None = None  # Amazon Reviews files; None: synthetic prompts
    train_prompt_tokens: int = 256  # synthetic training prompts' length
    train_max_prompt_tokens: int | None = None  # head + tail cut of longer review prompts
    generate: bool = True
    generate_k: int = 4
    generate_prompt_tokens: int = 1024
    generate_new_tokens: int = 64
    generate_repeats: int = 3
    seed: int = 0
    output_dir: str = "runs/bench"
    command: str = ""

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
        for name, low in (
            ("repeats", 1),
            ("warmup", 0),
            ("decode_tokens", 0),
            ("train_batch_size", 1),
            ("train_prompt_tokens", 1),
            ("generate_prompt_tokens", 1),
            ("generate_new_tokens", 1),
            ("generate_repeats", 1),
        ):
            if getattr(self, name) < low:
                raise KMergeConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if min(self.lengths) < 1:
            raise KMergeConfigError(f"prompt lengths must be >= 1 token, got {min(self.lengths)}")


# ---------------------------------------------------------------------------- building blocks
def synthetic_prompt(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """A prompt of exactly ``n_tokens`` tokens: seeded random common words, each of which the
    tokenizer encodes as one token (checked), joined by spaces; if the joined text still
    tokenises differently (a tokenizer that merges across spaces), words are added or removed
    until the count is exact."""
    singles = [w for w in WORDS if len(_ids(tokenizer, " " + w)) == 1]
    if not singles:
        raise KMergeConfigError("cannot build synthetic prompts: no single-token words found")
    rng = random.Random(seed)
    words = [rng.choice(singles) for _ in range(n_tokens)]
    for _ in range(8):
        text = "".join(" " + w for w in words)
        excess = len(_ids(tokenizer, text)) - n_tokens
        if excess == 0:
            return text
        words = words[:-excess] if excess > 0 else words + words[:-excess]
    raise KMergeConfigError(f"cannot build a prompt of exactly {n_tokens} tokens")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenize_prompts(tokenizer, [text])[0]


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a KV cache (transformers ``Cache`` objects,
    or the legacy tuple of (key, value) pairs)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = list(cache)
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if t is not None)


def first_token(lm, **inputs) -> tuple[torch.Tensor, object]:
    """One prefill forward: the greedy first token [B, 1] and the KV cache. Only the last
    position gets logits, as in ``generate``."""
    out = lm(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values


def kmerge_prefill(model: KMergeModel, prompts: Sequence[str]) -> tuple[torch.Tensor, object]:
    """kmerge end to end: tokenise, embed, merge, then the LoRA model's prefill."""
    batch = model.prepare(prompts)
    return first_token(model.lm, **_model_inputs(batch))


def raw_prefill(lm, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The raw base model (no LoRA, no encoder) fed token ids: the limit for this length."""
    return first_token(lm, input_ids=ids)


def _model_inputs(batch: CompressedBatch) -> dict:
    return dict(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    )


def decode(model: KMergeModel, prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    """kmerge prefill, then ``n_tokens`` greedy steps on the KV cache (EOS not special)."""
    batch = model.prepare(prompts, reserve=n_tokens)
    token, cache = first_token(model.lm, **_model_inputs(batch))
    mask, position = batch.attention_mask, batch.position_ids[:, -1:]
    tokens = [token]
    for _ in range(n_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        out = model.lm(
            input_ids=tokens[-1],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1).tolist()


def rerun_generate(model: KMergeModel, prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    """Greedy generation without a KV cache: the whole sequence (merged prompt + tokens so far)
    is run again, all logits included, for every new token. EOS is suppressed, as
    ``min_new_tokens=n_tokens`` does in ``generate``, so both produce exactly n tokens."""
    batch = model.prepare(prompts, reserve=n_tokens)
    embeds, mask, positions = batch.inputs_embeds, batch.attention_mask, batch.position_ids
    embed, eos = model.lm.get_input_embeddings(), model.tokenizer.eos_token_id
    tokens = []
    for _ in range(n_tokens):
        logits = model.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits[:, -1]
        logits[:, eos] = -math.inf
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        embeds = torch.cat([embeds, embed(token)], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return torch.cat(tokens, dim=1).tolist()


def cached_generate(model: KMergeModel, prompts: Sequence[str], n_tokens: int) -> list[list[int]]:
    """kmerge's own KV-cached generation, forced to produce exactly ``n_tokens``."""
    return model.generate_ids(prompts, n_tokens, min_new_tokens=n_tokens)


def full_logits_loss(model: KMergeModel, batch: CompressedBatch) -> torch.Tensor:
    """The reference training loss: logits on every position, then the answer tokens picked
    by ``ignore_index``. Equal to ``model.loss(batch).loss``, which applies the LM head only
    where labels are."""
    logits = model.lm(**_model_inputs(batch), use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch.labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
    )


def build_models(base, tokenizer, ks: Sequence[int]) -> dict[int, KMergeModel]:
    """One KMergeModel per K around one base model; they share its LoRA layers (from_base
    injects LoRA into the base in place, so it is called once) and each has its own encoder."""
    ks = sorted(set(ks))
    first = KMergeModel.from_base(base, KMergeConfig(k=ks[0]), tokenizer=tokenizer)
    models = {ks[0]: first}
    for k in ks[1:]:
        config = dataclasses.replace(first.config, k=k)
        encoder = KMergeModel._make_encoder(first.lm, config)
        models[k] = KMergeModel(first.peft_model, encoder, tokenizer, config)
    return {k: m.eval() for k, m in models.items()}


# ---------------------------------------------------------------------------- clocks, memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading clocks


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def spread(samples: Sequence[float]) -> dict:
    """Median, quartiles and range of repeated measurements."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {
        "median": statistics.median(s),
        "q1": q[0],
        "q3": q[2],
        "min": s[0],
        "max": s[-1],
        "n": len(s),
    }


class _RssSampler(threading.Thread):
    """Polls the process's resident set size every millisecond and keeps the peak."""

    def __init__(self, process) -> None:
        super().__init__(daemon=True)
        self.process, self.done = process, threading.Event()
        self.peak = process.memory_info().rss

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(0.001)


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory while ``fn`` runs: allocated bytes on a GPU, RSS on a CPU (sampled, so
    approximate; None without psutil). ``added`` is the peak minus the level before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"kind": "cuda_allocated", "peak": peak, "added": peak - before}
    try:
        import psutil  # accelerate's dependency, so normally present
    except ImportError:
        return {"kind": "rss", "peak": None, "added": None}
    sampler = _RssSampler(psutil.Process())
    before = sampler.peak
    sampler.start()
    try:
        fn()
    finally:
        sampler.done.set()
        sampler.join()
    return {"kind": "rss", "peak": sampler.peak, "added": sampler.peak - before}


def _interleaved(
    arms: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device,
    seed: int,
    label: str,
) -> dict[str, list[float]]:
    """Time every arm once per round, in a fresh random order each round, so that slow drifts
    of the machine (heat, other load) spread over all arms; warm-up rounds are dropped."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(warmup + rounds):
        _progress(f"{label}: round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}")
        order = list(arms)
        rng.shuffle(order)
        for name in order:
            seconds = timed(arms[name], device)
            if r >= warmup:
                times[name].append(seconds)
    return times


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the benchmarks
def bench_prefill(models: dict[int, KMergeModel], raw_lm, cfg: BenchConfig, device) -> list[dict]:
    """Prefill, decode, KV cache and memory for every (L, K); see the module docstring."""
    tokenizer = next(iter(models.values())).tokenizer
    prompts = {n: synthetic_prompt(tokenizer, n, cfg.seed) for n in cfg.lengths}
    ids = {n: torch.tensor([_ids(tokenizer, p)], device=device) for n, p in prompts.items()}
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
        times = _interleaved(arms, cfg.repeats, cfg.warmup, device, cfg.seed, "prefill")
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
        # lr 0: the steps cost the same, and the shared LoRA stays as it was for other runs.
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.0)
        batch = model.prepare(prompts, answers)
        tokens[k] = sum(batch.prompt_tokens) + int((batch.labels != IGNORE_INDEX).sum())
        for head in ("labels", "full"):
            arms[f"{k}/{head}"] = lambda m=model, o=optimizer, f=head == "full": train_step(
                m, o, prompts, answers, f
            )
    try:
        times = _interleaved(arms, cfg.repeats, cfg.warmup, device, cfg.seed, "train")
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
        times = _interleaved(
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


# ---------------------------------------------------------------------------- running it
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
    shared_lora = next(iter(models.values()))  # merging its LoRA merges every K's (shared)
    result = {"machine": machine_info(device, dtype), "settings": dataclasses.asdict(cfg)}
    if cfg.merge_lora:  # inference as kmerge eval / generate run it
        shared_lora.merge_lora()
    result["prefill"] = bench_prefill(models, raw_lm, cfg, device)
    shared_lora.unmerge_lora()  # training needs the LoRA branch
    result["train"] = bench_train(models, cfg, device) if cfg.train else None
    if cfg.merge_lora:
        shared_lora.merge_lora()
    result["generate"] = (
        bench_generate(models[cfg.generate_k], cfg, device) if cfg.generate else None
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", result)
    plot_speedup(result["prefill"], out / "bench.png")
    return result


# ---------------------------------------------------------------------------- reporting
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
            "method | s (IQR) | tokens/s",
            "--- | --- | ---",
            f"cached generate_ids | {_s(g['cached_s'])} | {g['cached_tokens_per_s']:.1f}",
            f"re-run per token | {_s(g['rerun_s'])} | {g['rerun_tokens_per_s']:.1f}",
            f"speedup | {g['speedup']:.1f}x |",
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


__all__ = [
    "BenchConfig",
    "build_models",
    "cached_generate",
    "format_tables",
    "full_logits_loss",
    "kv_cache_bytes",
    "kmerge_prefill",
    "raw_prefill",
    "rerun_generate",
    "run_bench",
    "synthetic_prompt",
]
