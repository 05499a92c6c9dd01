#!/usr/bin/env bash
# benchmarks/quality/tree.sh NAME SEED FLAGS: 20-CPU-minute tree `small` command (docs/quality.md), bf16
# Starts in the background (one thread); log runs/q/NAME.log, whose last line is the result.
source "$(dirname "$0")/start.sh"
start "$1" "$2" --stage small --n-eval 512 --save-every 50 "${@:3}"
