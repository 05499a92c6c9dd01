# Sourced by tree.sh, amz.sh and cp.sh: what their 20-CPU-minute commands share.
# start NAME SEED FLAGS: one background `kmerge train` on one thread, bf16, 1,200 CPU-seconds,
# output runs/q/NAME/, log runs/q/NAME.log (its last line is the result); later flags win.
start() {
  local name=$1 seed=$2
  shift 2
  cd "$(dirname "${BASH_SOURCE[0]}")/../.." && mkdir -p runs/q
  OMP_NUM_THREADS=1 nohup .venv/bin/kmerge train --steps 5000 --time-budget 1200 \
    --budget-clock cpu --eval-every 5000 --seed "$seed" --mixed-precision bf16 --no-progress \
    --output-dir "runs/q/$name" "$@" > "runs/q/$name.log" 2>&1 &
  echo "started $name"
}
