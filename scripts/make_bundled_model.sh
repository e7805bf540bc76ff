#!/bin/bash
# How the bundled model (qsmrim_app/data/model) and its model card's figures are made, end to end.
#
#   scripts/make_bundled_model.sh WORKDIR [STAGE...]     STAGE: generate merge participant train floors heldout
#
# With no STAGE every stage runs in order (~2 h on 2 CPU cores). Each stage's wall time and peak memory go to
# WORKDIR/<stage>.time (GNU time -v). Needs the app installed (`make install`; QSMRIM_BIN=.venv/bin by default)
# and the shared data (DATA, default ../shared/data). The cohort is deterministic: the semi-real sessions depend
# only on (seed, patient, grid), the phantoms on their seeds.
#   training: semi-real patients 01-14, odd ones on 0.75x0.75x3 mm, even ones on 1 mm isotropic, 01 and 02 on both
#             (16 scans), plus phantoms: 4 full-size (0.75x0.75x3 mm, seed 101) and 10 small (1.6x1.6x2.6 mm,
#             seeds 202 and 303), relabelled sub-phf*, sub-phs*, sub-pht*
#   held out: patients 15-20 on the 0.6x0.6x2 mm grid no model is trained on, 15 also on 0.75x0.75x3, 16 on 1 mm
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:?usage: $0 WORKDIR [STAGE...]}
shift
STAGES=${*:-generate merge participant train floors heldout}
BIN=${QSMRIM_BIN:-$REPO/.venv/bin}
DATA=${DATA:-$REPO/../shared/data}
NPROCS=${NPROCS:-2}
mkdir -p "$WORK"
cd "$WORK"
WORK=$(pwd)

generate() {
    local synth="$BIN/qsmrim-synth" semi="--semi-real --data-dir $DATA --head-cache $WORK/head"
    $synth gen/a075 $semi --patients 1,2,3,5,7,9,11,13 --grids 0.75x0.75x3
    $synth gen/b1 $semi --patients 1,2,4,6,8,10,12,14 --grids 1x1x1
    $synth gen/t06 $semi --patients 15-20 --grids 0.6x0.6x2
    $synth gen/t075 $semi --patients 15 --grids 0.75x0.75x3
    $synth gen/t1 $semi --patients 16 --grids 1x1x1
    $synth ph/full --subjects 4 --size full --seed 101
    $synth ph/small --subjects 6 --size small --seed 202
    $synth ph/small2 --subjects 4 --size small --seed 303
}

merge() {
    rm -rf train_bids test_bids
    "$BIN/python" "$REPO/scripts/merge_bids.py" train_bids gen/a075 gen/b1 ph/full:phf ph/small:phs ph/small2:pht
    "$BIN/python" "$REPO/scripts/merge_bids.py" test_bids gen/t06 gen/t075 gen/t1
}

participant() {
    # The semi-real head is two people (COSMOS QSM, Ljubljana FLAIR): their brain outlines disagree by ~6.5 mm at
    # the head's truth (measured, docs/registration.md), so the registration gate (2 mm) would fail every
    # semi-real unit; its truth is known here, the gate is for data whose truth is not.
    "$BIN/qsmrim" train_bids train_out participant --no-classify --nprocs "$NPROCS" -w work_train --registration-gate-mm 20
    "$BIN/qsmrim" test_bids test_out participant --no-classify --nprocs "$NPROCS" -w work_test --registration-gate-mm 20
}

train() {
    "$BIN/qsmrim" train_bids train_out group --train --protocol fast --weights-fp16
}

floors() {
    local m
    for m in shell-core logreg rf aprl-rf; do
        "$BIN/qsmrim" train_bids train_out group --train --protocol fast --method "$m"
    done
}

latest() { ls -td train_out/models/"$1"-* | head -1; }

heldout() {
    # the repository's bundled model is compared with what this run trained (it stays only if it does better)
    local models=() m
    for m in qsmrimnet logreg rf aprl-rf; do models+=(--model "$(latest $m)"); done
    "$BIN/python" "$REPO/benchmarks/bench_semireal.py" --train-out train_out --test-out test_out \
        "${models[@]}" --model "$REPO/qsmrim_app/data/model" --out "$WORK/semireal_heldout.json"
    "$BIN/python" "$REPO/benchmarks/cv_by_grid.py" --output-dir train_out "${models[@]}" \
        --model "$(latest shell-core)" --out "$WORK/cv_by_grid.json"
}

export REPO WORK BIN DATA NPROCS
export -f generate merge participant train floors latest heldout
for stage in $STAGES; do
    echo "== $stage ($(date -u +%FT%TZ))"
    /usr/bin/time -v -o "$WORK/$stage.time" bash -euo pipefail -c "$stage"
    grep -E "Elapsed|Maximum resident" "$WORK/$stage.time"
done
