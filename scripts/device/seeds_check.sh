#!/usr/bin/env bash
# Batched seeds on a lent H100/H200 (that machine has torch and timm but no deepspeed, no DALI, no network): the
# paper's Table 1 pair at the full NB201 protocol (configs/search/nb201_cifar10.yaml: C=16, 5 cells per stage,
# 25k/25k, batch 64, 50 epochs), seeds 0-3 each trained in one process (`seeds: [0,1,2,3]`, run by
# scripts/nb201_stability.py), both processes at once on the one GPU:
#   single_darts  Single-DARTS, that config as is (single-level; w SGD lr 0.005; alpha Adam 3e-4, betas 0.5/0.999)
#   darts_v1      DARTS-V1 on the NB201 protocol (bilevel; w as there but lr 0.025; alpha Adam 3e-4, wd 1e-3)
# Carry (scripts/device/prepare_carry.sh): .whl and .gpu.
#   bash scripts/device/seeds_check.sh [SECONDS]   # wall budget for everything (default 570: call with timeout_s 600)
# The searches get the budget less set-up and SEEDS_CHECK_RESERVE (30 s); then they checkpoint and stop. The run
# directories are runs/seeds_check/ (ignored: kept between calls on the same, still warm machine), so calling the
# script again resumes them (--resume) and continues; a fresh machine starts over.
# Writes to $OUT: log.txt, seeds_check.json (per seed: epochs done, per-epoch NB201 C10 test and elapsed s, last
# scores, s/epoch; scripts/device/seeds_report.py), table.md (both grids' tables), runs_tail.txt, <grid>.png.
# Exit code: 0 all finished, 124 stopped at the deadline, 1 a search failed, 3 set-up failed.
# Dry run of the logic on a CPU (tiny supernet, real CIFAR subset, runs/seeds_check_tiny/):
#   SEEDS_CHECK_TINY=1 bash scripts/device/seeds_check.sh 30   # stops at its deadline (exit 124), then
#   SEEDS_CHECK_TINY=1 bash scripts/device/seeds_check.sh 120  # resumes both batches and finishes (exit 0)
set -u
BUDGET=${1:-570}
OUT=${OUT:-/tmp/seeds_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }

if [ -n "${SEEDS_CHECK_TINY:-}" ]; then
  PY=${PY:-.venv/bin/python}; DEV=cpu; RESERVE=${SEEDS_CHECK_RESERVE:-10}
  RUNS=${SEEDS_CHECK_RUNS:-$PWD/runs/seeds_check_tiny}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  SHARED=$(cd "${SDARTS_SHARED:-../shared}" && pwd)
  DATA=$SHARED/data/cifar10-wds; TABLE=$SHARED/data/nb201/nb201_accuracies.csv.gz
  SIZE=(--set epochs=${TINY_EPOCHS:-10} --set model.C=2 --set model.cells_per_stage=1 --set data.max_per_split=128
        --set data.micro_batch=32 --set log.every_steps=2)
else
  PY=python3; DEV=cuda; RESERVE=${SEEDS_CHECK_RESERVE:-30}
  RUNS=${SEEDS_CHECK_RUNS:-$PWD/runs/seeds_check}
  export DS_ACCELERATOR=cuda PYTHONPATH=/tmp/site:$PWD
  [ -d /tmp/site/deepspeed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl || exit 3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())" || exit 3
  DATA=/tmp/cifar10-wds; TABLE=$PWD/.gpu/nb201_accuracies.csv.gz
  [ -f $DATA.done ] || { python3 scripts/device/cifar_pack.py unpack .gpu/cifar10_jpeg.npz $DATA \
      && touch $DATA.done; } || exit 3  # (a second call on the same machine skips this)
  SIZE=(--set log.every_steps=100)
fi
mkdir -p "$RUNS"
DEADLINE=$(( BUDGET - $(el) - RESERVE ))
[ $DEADLINE -gt 0 ] || { echo "error: no time left for the searches (budget ${BUDGET}s)"; exit 3; }
echo "set-up done at $(el)s; searches get ${DEADLINE}s; run directories $RUNS"
[ -n "$(ls "$RUNS"/*/runs/*/checkpoints/latest 2>/dev/null)" ] && echo "checkpoints found: the searches resume"

grid() {  # grid NAME TITLE OPTIONS...: one nb201_stability.py grid of one cell, its seeds in one process
  local name=$1 title=$2; shift 2
  $PY scripts/nb201_stability.py --config configs/search/nb201_cifar10.yaml --results "$RUNS/$name" --device $DEV \
      --seeds ${SEEDS:-0,1,2,3} --deadline-s $DEADLINE --grace-s 20 --title "$title" \
      --set "data.root=$DATA" --set "nb201_table=$TABLE" --set log.progress=false --set log.tensorboard=false \
      "${SIZE[@]}" "$@" > "$RUNS/$name.out" 2>&1
  local rc=$?
  echo "$name: nb201_stability.py rc=$rc at $(el)s (0 finished, 124 stopped at the deadline, 1 a search failed)"
  tail -4 "$RUNS/$name.out"
  return $rc
}
grid single_darts "Single-DARTS (nb201_cifar10.yaml as is), batched seeds" \
    --variants single_level:softmax --lrs 0.005 --alpha-optimizers adam &
G1=$!
grid darts_v1 "DARTS-V1 on the NB201 protocol, batched seeds" \
    --variants bilevel:softmax --lrs 0.025 --alpha-optimizers adam --set optim.alpha.weight_decay=0.001 &
G2=$!
EVERY=${SEEDS_CHECK_EVERY:-60}; n=0
# progress every EVERY s, which also keeps $OUT/seeds_check.json current should the call be cut off
while kill -0 $G1 2>/dev/null || kill -0 $G2 2>/dev/null; do
  sleep 5; n=$(( n + 5 ))
  [ $(( n % EVERY )) -eq 0 ] || continue
  echo "[$(el)s] progress$([ $DEV = cuda ] && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader \
      | sed 's/^/; GPU util, memory: /')"
  $PY scripts/device/seeds_report.py "$RUNS" "$OUT/seeds_check.json" --brief
done
wait $G1; R1=$?; wait $G2; R2=$?

for g in single_darts darts_v1; do
  cat "$RUNS/$g/table.md" 2>/dev/null; echo
  cp "$RUNS/$g/trajectories.png" "$OUT/$g.png" 2>/dev/null
done > "$OUT/table.md"
for f in "$RUNS"/*/logs/*.log; do echo "== $f"; grep -v Warning "$f" | tail -8; done > "$OUT/runs_tail.txt"
LOGS=("$RUNS"/*/logs/*.log)
if grep -q "cuda_graphs: recording failed" "${LOGS[@]}"; then grep -h "cuda_graphs: recording failed" "${LOGS[@]}"
else echo "no CUDA-graph recording failure logged (on a GPU the steps ran recorded)"; fi
grep -h -A3 "Traceback\|numerical fault\|non-finite" "${LOGS[@]}" | head -30
echo
if $PY scripts/device/seeds_report.py "$RUNS" "$OUT/seeds_check.json"; then
  echo "all searches finished their epochs at $(el)s"
else
  echo "NOT FINISHED at $(el)s: not every seed reached its last epoch (above); calling this script again on the"
  echo "same machine resumes the searches from their checkpoints (--resume) and continues"
fi
for r in $R1 $R2; do [ $r -eq 0 ] || [ $r -eq 124 ] || exit 1; done  # a search failed (or bad input: 2)
[ $R1 -eq 0 ] && [ $R2 -eq 0 ] && exit 0
exit 124
