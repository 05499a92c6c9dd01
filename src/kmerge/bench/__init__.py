"""``kmerge bench``: how much cheaper K-Token Merging makes a prompt, measured side by side.

Four measurements, on one KMergeModel per K (``build_models``: one language model with fresh
LoRA shared by all, an encoder per K; the raw model is one more copy):

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

Measuring: ``config`` (BenchConfig, device, dtype), ``paths`` (the compared code paths and the
models), ``clock`` (timing and memory), ``measure`` (the three benchmarks), ``run``
(``run_bench``, which writes bench.json); reporting: ``report`` (tables, plot).
"""

from kmerge.bench.config import BenchConfig
from kmerge.bench.paths import (
    build_models,
    cached_generate,
    full_logits_loss,
    kmerge_prefill,
    kv_cache_bytes,
    raw_prefill,
    rerun_generate,
    synthetic_prompt,
)
from kmerge.bench.report import format_tables, plot_speedup
from kmerge.bench.run import run_bench

__all__ = [
    "BenchConfig",
    "build_models",
    "cached_generate",
    "format_tables",
    "full_logits_loss",
    "kv_cache_bytes",
    "kmerge_prefill",
    "plot_speedup",
    "raw_prefill",
    "rerun_generate",
    "run_bench",
    "synthetic_prompt",
]
