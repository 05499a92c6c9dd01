#!/usr/bin/env bash
# benchmarks/quality/amz.sh NAME SEED FLAGS: 20-minute Amazon command (docs/quality.md), bf16, train prior
# Starts in the background (one thread); log runs/q/NAME.log, whose last line is the result.
source "$(dirname "$0")/start.sh"
start "$1" "$2" --task amazon_reviews --data-dir ../shared/data/amazon_reviews \
  --max-prompt-tokens 96 --batch-size 16 --n-eval 512 --balance-classes --save-every 100 \
  --choice-prior train "${@:3}"
