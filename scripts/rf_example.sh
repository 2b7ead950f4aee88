#!/usr/bin/env bash
# The README's worked example: one 5x5 vs two stacked 3x3 on the CIFAR-10 copy,
# 3 seeds x 2 variants, 5 epochs each, 2 jobs in parallel, then the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=${ARCHIVE:-../shared/datasets/cifar10-jpg.tar.gz}
.venv/bin/cnnlab train -m experiment=rf "data.archive=$(realpath "$ARCHIVE")" \
    hydra/launcher=joblib hydra.launcher.n_jobs=2 tracking.log_model=false "$@"
.venv/bin/cnnlab compare "rf: one 5x5 vs two stacked 3x3" --format markdown --out runs/rf_example
