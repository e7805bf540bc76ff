#!/usr/bin/env bash
# Train a tiny qsmrim model on a BIDS dataset and print its directory (CI helper).
#
# Why: classification and the group level need a model. Until the app ships a bundled one, the CI stages
# (.ci/container.sh, .ci/slurm.sh) train a deliberately tiny one (2 epochs, 2 folds, 1 seed, 1/8 width:
# seconds on a CPU) with the app itself, so the runs they compare exercise every step up to the group table.
#
# Usage: scripts/ci_tiny_model.sh BIDS_DIR SCRATCH_DIR   (uses `qsmrim` on PATH; prints the model path)
set -euo pipefail
bids="$1"
scratch="$2"
mkdir -p "$scratch"
qsmrim "$bids" "$scratch/train-out" participant --no-classify --omp-nthreads 1 --nprocs 2 \
    -w "$scratch/train-work" >"$scratch/train-participant.log" 2>&1 \
    || { tail -n 30 "$scratch/train-participant.log" >&2; exit 1; }
qsmrim "$bids" "$scratch/train-out" group --train --epochs 2 --folds 2 --seeds 1 --width-multiplier 0.125 \
    --batch-size 32 >"$scratch/train-group.log" 2>&1 \
    || { tail -n 30 "$scratch/train-group.log" >&2; exit 1; }
models=("$scratch"/train-out/models/qsmrimnet-*/)
[[ ${#models[@]} -eq 1 && -f "${models[0]}model.json" ]] \
    || { echo "expected one trained model under $scratch/train-out/models, found: ${models[*]}" >&2; exit 1; }
echo "${models[0]%/}"
