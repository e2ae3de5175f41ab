#!/usr/bin/env bash
# One-shot performance check on a lent H100/H200 (that machine has torch and timm but no deepspeed, no DALI, no network).
# Carry (built by scripts/device/prepare_carry.sh): .whl (deepspeed + deps for py3.12), and .gpu (cifar10_jpeg.npz,
# nb201_accuracies.csv.gz, 128 ImageNet JPEGs; the search phase needs it) or .gpu2 (400 ImageNet JPEGs only: enough
# for the benchmark at the one-GPU micro-batch of 360; the tests and bench phases need no more).
#   bash scripts/device/perf_check.sh [SECONDS]     # SECONDS: wall budget for everything (default 560)
# Measured 2026-11-28 on an H200 (docs/performance.md). Order: CUDA-graph tests, the supernet step benchmark, then the
# full NB201 search (50 epochs, 25k images, batch 64, CIFAR on the GPU) with what is left; its per-epoch times
# give the 50-epoch wall time even when the budget cuts it short.
set -u
BUDGET=${1:-560}
PHASES=${PHASES:-tests bench search}   # which parts run; BENCH_EXTRA: more benchmark flags (--imagenet-batch 90)
OUT=${OUT:-/tmp/perf_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda SDARTS_SHARED=/tmp/shared
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
mkdir -p /tmp/shared/data
for d in .gpu2 .gpu; do  # the larger JPEG set when both travel
  [ -d "$d/imagenet-sample" ] && { ln -sfn "$PWD/$d/imagenet-sample" /tmp/shared/data/imagenet-sample; break; }
done
if [ -f .gpu/cifar10_jpeg.npz ]; then
  python3 scripts/device/cifar_pack.py unpack .gpu/cifar10_jpeg.npz /tmp/shared/data/cifar10-wds || exit 3
fi
echo "setup done at $(el)s"

# 1. correctness of the recorded step on this GPU (model level, then the real launcher graphed vs eager)
if [[ " $PHASES " == *" tests "* ]]; then
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py > "$OUT/pytest_graphs.txt" 2>&1
  echo "pytest graphs rc=$? at $(el)s"; tail -3 "$OUT/pytest_graphs.txt"
fi

# 2. supernet step, bf16: the DARTS ImageNet supernet first (the open target), at batch 64 (classic vs default vs
#    grouped, eager and graphed), then at the micro-batch the launcher plans for one H100/H200 (PLAN_BATCH: 360 =
#    the paper's global batch on one GPU; `launcher/plan.py --job configs/search/darts_imagenet.yaml --gpu h200`);
#    (`fused+graphs` is the default cell in NCHW: which layout wins once launches are gone); then NB201 in fp32
#    with graphs. The tests and bench phases take up to ~520 s with set-up: call with timeout_s >= 540.
if [[ " $PHASES " == *" bench "* ]]; then
  timeout ${BENCH_S:-130} python3 benchmarks/supernet_step.py --device cuda --precision bf16 \
      --cases darts_imagenet --variants classic,default,default+graphs,grouped,grouped+graphs ${BENCH_EXTRA:-} \
      --steps 10 --warmup 3 > "$OUT/bench_bf16.txt" 2>&1
  echo "bench bf16 rc=$? at $(el)s"; grep '^#' "$OUT/bench_bf16.txt"
  timeout ${BENCH_S:-130} python3 benchmarks/supernet_step.py --device cuda --precision bf16 \
      --cases darts_imagenet --variants default+graphs,grouped+graphs,fused+graphs,grouped --imagenet-batch ${PLAN_BATCH:-360} \
      --steps 8 --warmup 3 > "$OUT/bench_bf16_plan.txt" 2>&1
  echo "bench bf16 batch ${PLAN_BATCH:-360} rc=$? at $(el)s"; grep '^#' "$OUT/bench_bf16_plan.txt"
  # where the GPU time of that step goes: kernel time by category, and the ceiling a graphed step can reach
  timeout ${PROFILE_S:-80} python3 benchmarks/step_profile.py --device cuda --precision bf16 --case darts_imagenet \
      --imagenet-batch ${PLAN_BATCH:-360} --variants default,grouped --steps 3 --warmup 2 --top 25 \
      > "$OUT/profile_plan.txt" 2>"$OUT/profile_plan.err"
  echo "profile rc=$? at $(el)s"; grep -A12 '^==' "$OUT/profile_plan.txt" | grep -v '^top'
  timeout 50 python3 benchmarks/supernet_step.py --device cuda --precision fp32 --cases nb201 \
      --variants classic,default,default+graphs --steps 40 --warmup 5 > "$OUT/bench_nb201_fp32.txt" 2>&1
  echo "bench nb201 fp32 rc=$? at $(el)s"; tail -2 "$OUT/bench_nb201_fp32.txt"
fi

# 3. the full NB201 search, Single-DARTS defaults, CIFAR held and augmented on the GPU, graphed step (auto)
[[ " $PHASES " == *" search "* ]] || { echo "done at $(el)s"; exit 0; }
[ -d /tmp/shared/data/cifar10-wds ] || { echo "error: the search phase needs .gpu (cifar10_jpeg.npz) carried"; exit 3; }
RUNS=/tmp/runs; mkdir -p $RUNS
BASE=(--config configs/search/nb201_cifar10.yaml --set data.root=/tmp/shared/data/cifar10-wds
      --set "nb201_table=$PWD/.gpu/nb201_accuracies.csv.gz" --set log.progress=false --set log.every_steps=100
      --set log.tensorboard=false)
LIMIT=$(( BUDGET - $(el) - 10 ))
echo "search gets ${LIMIT}s"
timeout $LIMIT python3 launcher/search.py "${BASE[@]}" --set engine.cuda_graphs=auto --run-dir $RUNS/nb201_graphs \
    > $RUNS/nb201_graphs.log 2>&1
rc=$?; echo "search (graphs) rc=$rc at $(el)s"
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $(( BUDGET - $(el) )) -gt 90 ]; then  # recording broke: measure eager
  grep -v Warning $RUNS/nb201_graphs.log | tail -5
  timeout $(( BUDGET - $(el) - 10 )) python3 launcher/search.py "${BASE[@]}" --run-dir $RUNS/nb201_eager \
      > $RUNS/nb201_eager.log 2>&1
  echo "search (eager) rc=$? at $(el)s"
fi
python3 scripts/device/collect.py $RUNS "$OUT/search.json"
for f in $RUNS/*.log; do echo "== $f"; grep -v Warning "$f" | tail -6; done > "$OUT/search_tail.txt"
python3 - "$OUT/search.json" <<'PY'
import json, sys
for name, r in json.load(open(sys.argv[1])).items():
    e = r["elapsed_s"]
    per = (e[-1] - e[0]) / (len(e) - 1) if len(e) > 1 else None
    print(f"{name}: finished={r['finished']} epochs={r['epochs_done']} elapsed={e[-1] if e else None}s "
          f"per_epoch={per} startup+first={e[0] if e else None} projected_50={e[0] + 49 * per if per else None} "
          f"img/s={r['images_per_s_mean']} final={r['trajectory_cifar10_test'][-1] if e else None}")
PY
echo "done at $(el)s"
