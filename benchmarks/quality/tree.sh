#!/usr/bin/env bash
# benchmarks/quality/tree.sh NAME SEED FLAGS: 20-CPU-minute tree `small` command (docs/quality.md), bf16
# Starts in the background (one thread); log runs/q/NAME.log, whose last line is the result.
name=$1; seed=$2; shift 2
cd "$(dirname "$0")/../.." && mkdir -p runs/q
OMP_NUM_THREADS=1 nohup .venv/bin/kmerge train --stage small --steps 5000 --time-budget 1200 \
  --budget-clock cpu --n-eval 512 --save-every 50 --eval-every 5000 --seed "$seed" \
  --mixed-precision bf16 --no-progress --output-dir runs/q/$name "$@" > runs/q/$name.log 2>&1 &
echo started $name
