#!/usr/bin/env bash
# The README's worked example: one 5x5 vs two stacked 3x3 on the CIFAR-10 copy, decided by
# `cnnlab ablate` (rounds of 2 seeds until the anytime-valid interval decides, at most 20),
# 2 single-thread jobs in parallel, then the comparison of every run it trained.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=${ARCHIVE:-../shared/datasets/cifar10-jpg.tar.gz}
.venv/bin/cnnlab ablate rf --max-seeds 20 --margin 0.005 "data.archive=$(realpath "$ARCHIVE")" \
    hydra/launcher=joblib hydra.launcher.n_jobs=2 trainer.threads=1 "$@"
.venv/bin/cnnlab compare "rf: one 5x5 vs two stacked 3x3" --format markdown --out runs/rf_example
