#!/usr/bin/env bash
# Builds the ignored folders that a device call carries (the GPU machine has torch and timm but no deepspeed, no
# DALI, no ../shared and no network; a call carries at most 64 MiB). Run here, then name the folders in the device call's `carry`:
#   .whl   deepspeed 0.19.8 + the dependencies that machine lacks, for its python 3.12 (5.6 MB)
#   .gpu   cifar10_jpeg.npz (the 50k training JPEGs, 46 MB: cifar_pack.py), nb201_accuracies.csv.gz, and
#          imagenet-sample/train with GPU_JPEGS images (default 128), one per class folder
#   .gpu2  imagenet-sample/train only, BENCH_JPEGS images (default 400: the DARTS ImageNet benchmark at the
#          launcher's one-GPU micro-batch of 360 needs one batch of real images)
# Usage: bash scripts/device/prepare_carry.sh            then e.g.
#   run(command="PHASES='tests bench' bash scripts/device/perf_check.sh 300", carry=[".whl", ".gpu2"])
#   run(command="PHASES=search bash scripts/device/perf_check.sh 540", carry=[".whl", ".gpu"])
#   run(command="bash scripts/device/seeds_check.sh", carry=[".whl", ".gpu"], timeout_s=600)   # batched seeds, Table 1 pair
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SDARTS_SHARED:-../shared}
PY=${PY:-.venv/bin/python}
[ -d "$SHARED/wheels/device-py312" ] || { echo "error: $SHARED/wheels/device-py312 not found" >&2; exit 2; }
for d in .whl .gpu .gpu2; do
  git check-ignore -q "$d/" || { echo "error: $d is not ignored by git (.gitignore)" >&2; exit 2; }
done

rm -rf .whl && mkdir .whl && cp "$SHARED"/wheels/device-py312/*.whl .whl/

jpegs() {  # jpegs DEST N: the first JPEG of the first N class folders
  local dest=$1 n=$2 i=0
  rm -rf "$dest" && mkdir -p "$dest"
  for cls in "$SHARED"/data/imagenet-sample/train/*/; do
    [ $i -lt "$n" ] || break
    f=$(ls "$cls" | grep -iE '\.jpe?g$' | head -1) || true
    [ -n "$f" ] || continue
    mkdir -p "$dest/$(basename "$cls")" && cp "$cls/$f" "$dest/$(basename "$cls")/"
    i=$((i + 1))
  done
  echo "$dest: $i JPEGs"
}

mkdir -p .gpu
[ -f .gpu/cifar10_jpeg.npz ] || $PY scripts/device/cifar_pack.py pack "$SHARED/data/cifar10-wds" .gpu/cifar10_jpeg.npz
cp "$SHARED/data/nb201/nb201_accuracies.csv.gz" .gpu/
jpegs .gpu/imagenet-sample/train "${GPU_JPEGS:-128}"
jpegs .gpu2/imagenet-sample/train "${BENCH_JPEGS:-400}"
du -sh .whl .gpu .gpu2
