#!/usr/bin/env bash
# benchmarks/quality/cp.sh NAME SEED FLAGS: 20-minute CommitPackFT command (docs/quality.md), bf16
# Starts in the background (one thread); log runs/q/NAME.log, whose last line is the result.
source "$(dirname "$0")/start.sh"
start "$1" "$2" --task commitpackft --data-dir ../shared/data/commitpackft_python \
  --max-file-chars 1200 --batch-size 4 --n-eval 19 --save-every 100 "${@:3}"
