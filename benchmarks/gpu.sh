#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one run of under 8 minutes on one GPU, figures
# written to $OUT (the device tool's output folder) or runs/gpu:
#   1. seeds per second of S stacked copies of the chapter's baseline against S lone networks,
#      S = 1, 16, 64, 256 (benchmarks/stacked_step.py; the issue's goal: 64 stacked seeds in
#      under 3x the time of one);
#   1b. whole training of 1, 16, 64, 256 seeds as one stacked job vs lone runs (benchmarks/stacked_seeds.py,
#      seeds per second and each run's accuracy), when the CIFAR-10 copy is at $ARCHIVE;
#   2. the airbench-style preset's test accuracy and time (experiment=airbench), when the
#      CIFAR-10 copy is at $ARCHIVE (carry it: the device machine cannot reach ../shared).
# Usage (device tool):  bash benchmarks/gpu.sh    (ARCHIVE=data/cifar10-jpg.tar.gz to add 2.)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/machine.txt" 2>&1
# 1. Stacked seeds: lone vs stacked (grouped modules) vs vmap, per step, interleaved.
timeout 300 $PY benchmarks/stacked_step.py --stacks 1 16 64 256 --repeats 3 --steps 20 --warmup 5 \
    --contenders lone stacked stacked-cl vmap 2>&1 | tee "$out/stacked_seeds.txt"
# 1b. Whole training of S seeds, stacked job vs lone runs one after another (benchmarks/stacked_seeds.py):
#     seeds per second at S = 1, 16, 64, 256 (lone runs measured up to 16, estimated above), with
#     each run's accuracy; needs the CIFAR-10 copy at $ARCHIVE.
if [ -n "${ARCHIVE:-}" ] && [ -f "$ARCHIVE" ]; then
    timeout 300 $PY benchmarks/stacked_seeds.py --seeds 1 16 64 256 --sequential-max 16 --repeats 1 \
        --subset 10000 --epochs 2 --accelerator gpu "--archive=$(realpath "$ARCHIVE")" 2>&1 \
        | grep -v "GPU available\|TPU available\|litlogger\|stepping batches\|max_epochs=\|LeafSpec" \
        | tee "$out/stacked_seeds_training.txt"
else
    echo "stacked_seeds: skipped (set ARCHIVE to the CIFAR-10 copy)" | tee "$out/stacked_seeds_training.txt"
fi
# 2. The airbench-style recipe (conf/experiment/airbench.yaml) on the GPU, tracked in $out.
if [ -n "${ARCHIVE:-}" ] && [ -f "$ARCHIVE" ]; then
    /usr/bin/time -f "wall %e s" timeout 150 $PY -m cnnlab.cli train experiment=airbench \
        "data.archive=$(realpath "$ARCHIVE")" trainer.accelerator=gpu "paths.runs=$out/runs" \
        tracking.log_model=false 2>&1 | tail -20 | tee "$out/airbench.txt"
else
    echo "airbench: skipped (set ARCHIVE to the CIFAR-10 copy)" | tee "$out/airbench.txt"
fi
