#!/usr/bin/env bash
# benchmarks/quality/amz.sh NAME SEED FLAGS: 20-minute Amazon command (docs/quality.md), bf16, train prior
# Starts in the background (one thread); log runs/q/NAME.log, whose last line is the result.
name=$1; seed=$2; shift 2
cd "$(dirname "$0")/../.." && mkdir -p runs/q
OMP_NUM_THREADS=1 nohup .venv/bin/kmerge train --task amazon_reviews --data-dir ../shared/data/amazon_reviews \
  --max-prompt-tokens 96 --batch-size 16 --n-eval 512 --eval-every 5000 --balance-classes \
  --steps 5000 --time-budget 1200 --budget-clock cpu --save-every 100 --seed "$seed" --no-progress \
  --mixed-precision bf16 --choice-prior train --output-dir runs/q/$name "$@" > runs/q/$name.log 2>&1 &
echo started $name
