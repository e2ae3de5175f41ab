#!/usr/bin/env bash
# One-shot GPU check on a lent H100/H200 (that machine has torch and timm but no deepspeed, no DALI, no network).
# Carry: .whl (deepspeed + deps for py3.12), .gpu (CIFAR-10 train JPEGs packed by cifar_pack.py, the NB201 table).
#   bash scripts/device/gpu_check.sh [SECONDS]     # SECONDS: wall budget for everything (default 520)
# Writes to $OUT: log.txt, bench.txt, results.json (all searches, per-epoch NB201 scores), runs_tail.txt.
set -u
BUDGET=${1:-520}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
python3 scripts/device/cifar_pack.py unpack .gpu/cifar10_jpeg.npz /tmp/cifar10-wds || exit 3
TABLE=$PWD/.gpu/nb201_accuracies.csv.gz

# 1. smoke: fail fast if the CUDA path is broken
timeout 150 python3 launcher/search.py --config configs/search/smoke.yaml --run-dir /tmp/smoke --force \
    --set log.progress=false || { echo "SMOKE FAILED at $(el)s"; exit 4; }
echo "smoke ok at $(el)s"

# 2. supernet step throughput, alone on the GPU
if [ -f benchmarks/supernet_step.py ]; then
  timeout 150 python3 benchmarks/supernet_step.py ${BENCH_ARGS:---device cuda --precision bf16} > "$OUT/bench.txt" 2>&1
  echo "bench rc=$? at $(el)s"; tail -3 "$OUT/bench.txt"
fi

# 3. full-protocol NB201 searches (C=16, 5 cells/stage, 32x32, batch 64, 50 epochs, 25k/25k), in parallel
RUNS=/tmp/runs; mkdir -p $RUNS
LIMIT=$(( BUDGET - $(el) - 25 ))
echo "searches get ${LIMIT}s"
BASE=(--config configs/search/nb201_cifar10.yaml --set data.root=/tmp/cifar10-wds --set "nb201_table=$TABLE"
      --set log.progress=false --set log.every_steps=100)
SGD025=(--set optim.w.lr=0.025 --set optim.alpha.optimizer=sgd --set optim.alpha.lr=0.025 --set optim.alpha.weight_decay=0.0003)
pids=()
run() { local name=$1; shift; timeout $LIMIT python3 launcher/search.py "${BASE[@]}" --run-dir $RUNS/$name "$@" \
          > $RUNS/$name.log 2>&1 & pids+=($!); }
run A_single_softmax_adam                                             # Table 1, Single-DARTS defaults
run B_darts_adam --set strategy=bilevel --set optim.w.lr=0.025 --set optim.alpha.weight_decay=0.001   # Table 1 DARTS (NB201 DARTS-V1)
run C_single_sgd025 "${SGD025[@]}"                                    # Table 5, lr 0.025
run D_darts_sgd025 --set strategy=bilevel "${SGD025[@]}"              # Table 5, lr 0.025 (the collapse row)
( while sleep 15; do python3 scripts/device/collect.py $RUNS "$OUT/results.json"; done ) & COL=$!
for p in "${pids[@]}"; do wait $p; echo "run pid $p rc=$? at $(el)s"; done
kill $COL 2>/dev/null
python3 scripts/device/collect.py $RUNS "$OUT/results.json"
for f in $RUNS/*.log; do echo "== $f"; grep -v Warning "$f" | tail -4; done > "$OUT/runs_tail.txt"
python3 - "$OUT/results.json" <<'PY'
import json, sys
for name, r in json.load(open(sys.argv[1])).items():
    t = r["trajectory_cifar10_test"]
    print(f"{name}: finished={r['finished']} epochs={r['epochs_done']} wall={r['elapsed_s'][-1] if r['elapsed_s'] else None}s "
          f"final={t[-1] if t else None} worst2ndhalf={min(t[len(t)//2:]) if t else None} img/s={r['images_per_s_mean']}")
PY
echo "done at $(el)s"
