#!/bin/bash
# The GPU checks in one command, for a CUDA machine with the project installed: the tests marked gpu, then the
# step benchmark with each ghost BN layout and with plain BN, the loader's ceiling, the recipe overhead in the
# trainer's GPU settings and (given timm's train.py) the GPU preset end to end against timm. Records go to
# benchmarks/results/ as usual; each command's output to LOG_DIR.
#
#     benchmarks/gpu_checks.sh [TIMM_TRAIN_PY] [LOG_DIR]
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TIMM_TRAIN=${1:-}
LOG_DIR=${2:-benchmarks/.cache/gpu_logs}
mkdir -p "$LOG_DIR"
step() { echo "=== $1 ($(date -u +%H:%M:%S))"; }

step "tests marked gpu"
$PY -m pytest -p no:cacheprovider -o addopts="" -m gpu -rA -q tests > "$LOG_DIR/tests.log" 2>&1
tail -15 "$LOG_DIR/tests.log"

for variant in per_group packed per_device; do
    step "bench_step, trainer with ghost BN $variant"
    if [ "$variant" = per_device ]; then bn=(--bn per_device); else bn=(--bn-layout "$variant"); fi
    $PY benchmarks/bench_step.py --device cuda --precision bf16 --memory-format channels_last --iters 20 --repeats 3 \
        "${bn[@]}" > "$LOG_DIR/bench_step_$variant.log" 2>&1
    tail -5 "$LOG_DIR/bench_step_$variant.log"
done

step "loader ceiling on this host (14 workers, batches of 256): what the GPU preset's data wait allows"
$PY benchmarks/bench_data.py --workers 14 --batch-size 256 --classes 20 --per-class 400 > "$LOG_DIR/bench_data.log" 2>&1
tail -6 "$LOG_DIR/bench_data.log"

step "recipe overhead, ResNet-50 224 px bf16 channels_last, batch 256"
$PY benchmarks/bench_recipe_overhead.py --model resnet50 --image-size 224 --precision bf16 --channels-last \
    --batch-size 256 --iters 20 --repeats 5 > "$LOG_DIR/recipe_overhead.log" 2>&1
tail -18 "$LOG_DIR/recipe_overhead.log"

if [ -n "$TIMM_TRAIN" ]; then
    step "GPU preset against timm's train.py"
    $PY benchmarks/bench_vs_timm.py --timm-train "$TIMM_TRAIN" --preset gpu --repeats 3 > "$LOG_DIR/vs_timm.log" 2>&1
    tail -14 "$LOG_DIR/vs_timm.log"
fi
step "done"
