#!/usr/bin/env bash
# benchmarks/quality/cp.sh NAME SEED FLAGS: 20-minute CommitPackFT command (docs/quality.md), bf16
# Starts in the background (one thread); log runs/q/NAME.log, whose last line is the result.
name=$1; seed=$2; shift 2
cd "$(dirname "$0")/../.." && mkdir -p runs/q
OMP_NUM_THREADS=1 nohup .venv/bin/kmerge train --task commitpackft --data-dir ../shared/data/commitpackft_python \
  --max-file-chars 1200 --batch-size 4 --n-eval 19 --eval-every 5000 --save-every 100 \
  --steps 5000 --time-budget 1200 --budget-clock cpu --seed "$seed" --no-progress \
  --mixed-precision bf16 --output-dir runs/q/$name "$@" > runs/q/$name.log 2>&1 &
echo started $name
