#!/usr/bin/env bash
# The GPU benchmark run (one H100 lent through the device tool): both sides of each ratio in one run.
# Needs the offline wheels in .whl/ (smp, zarr, pydantic, nibabel); writes JSON lines to $OUT/gpu.jsonl.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/platform PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run() { timeout "$1" python3 "${@:2}" 2>>"$OUT/err.log" | tee -a "$OUT/gpu.jsonl"; }
run 120 benchmarks/train_step.py --encoder resnet50 --size 128 --batch 16 --steps 50 --rounds 5 --warmup 10
run 150 benchmarks/train_step.py --encoder resnet50 --size 128 --batch 512 --steps 10 --rounds 5 --warmup 5
run 240 benchmarks/train_step.py --encoder resnet50 --size 128 --batch 512 --steps 10 --rounds 3 --warmup 5 --compile
run 150 benchmarks/predict_volume.py --shape 512 512 400 --encoder resnet50 --device cuda
run 150 benchmarks/predict_volume.py --shape 512 512 400 --encoder resnet50 --device cpu
tail -5 "$OUT/err.log"
