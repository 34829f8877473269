#!/usr/bin/env bash
# The scale-out runs on one H200 host with 8 GPUs (or 4): the Llama-3-70B shape over tensor,
# pipeline and data meshes, the Mixtral-8x22B shape (281 GB) over expert and tensor, and
# data-parallel scaling of the Llama-3-8B shape. Every figure is one bench_parallel.py row
# (decode step, output tok/s, floor), written as JSON to bench/results/ (or $1).
#
#   bash scripts/bench_scaleout.sh [out_dir]
#
# Run it on the GPU machine with the NCCL settings it needs (NVLink multicast off).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
day=$(date -u +%F)
gpus=$(python3 -c "import jax; print(jax.device_count())")
long=(--batch 1 32 128 256 --token-buckets 32 128 256 --seq-buckets 32 128 256
      --kv-cache-memory 0.6)
if [ "$gpus" -ge 8 ]; then
  python3 scripts/bench_parallel.py --config configs/llama3-70b-random-tp2-gpu.yaml "${long[@]}" \
    --mesh tensor=8 --mesh tensor=4,pipeline=2 --mesh tensor=4,data=2 \
    --out "$out/scaleout-llama3-70b-h200x8-$day.json"
  python3 scripts/bench_parallel.py --config configs/mixtral-8x7b-random-ep2-gpu.yaml \
    --shape configs/shapes/mixtral-8x22b.json "${long[@]}" \
    --mesh expert=8 --mesh expert=4,tensor=2 \
    --out "$out/scaleout-mixtral-8x22b-h200x8-$day.json"
  python3 scripts/bench_parallel.py --config configs/llama3-8b-random-gpu.yaml --batch 128 \
    --kv-cache-memory 0.6 --mesh data=1 --mesh data=2 --mesh data=4 --mesh data=8 \
    --out "$out/scaleout-llama3-8b-data-h200x8-$day.json"
elif [ "$gpus" -ge 4 ]; then
  python3 scripts/bench_parallel.py --config configs/llama3-70b-random-tp2-gpu.yaml "${long[@]}" \
    --mesh tensor=4 --mesh tensor=2,pipeline=2 \
    --out "$out/scaleout-llama3-70b-h200x4-$day.json"
else
  echo "bench_scaleout.sh: needs 4 or 8 GPUs, found $gpus" >&2
  exit 2
fi
