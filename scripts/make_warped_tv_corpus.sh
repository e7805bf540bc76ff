#!/bin/bash
# The `warped-tv` family's corpus (docs/families.md), made and run through the app the way
# scripts/make_bundled_model.sh makes each of its families: every patient on the family's two grids
# (rounds 1-2, seed 0) and on a third grid the family does not otherwise use (round 3, seed 1); one merged
# BIDS dataset; the participant level with --no-classify (gate opened: the semi-real QSM and FLAIR are two
# people, docs/registration.md).
#
#   scripts/make_warped_tv_corpus.sh WORKDIR [STAGE...]     STAGE: generate participant
#
# Outputs: WORKDIR/bids/warped-tv (merged BIDS), WORKDIR/out/warped-tv (participant level).
# PY (default .venv/bin/python) runs both; DATA defaults to ../shared/data. The patients (01, 04, 12, 16)
# also carry other families' lesions (all 20 Ljubljana patients are in the bundled corpus).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:?usage: $0 WORKDIR [STAGE...]}
shift
STAGES=${*:-generate participant}
PY=${PY:-$REPO/.venv/bin/python}
DATA=${DATA:-$REPO/../shared/data}
FAM=warped-tv
PLAN="1:1:0.9x0.9x2 1:4:1x1x3 2:1:1x1x3 2:4:0.9x0.9x2 2:12:0.9x0.9x2 2:16:1x1x3
      3:1:0.75x0.75x3 3:4:1x1x1 3:12:0.6x0.6x2 3:16:0.75x0.75x3"
mkdir -p "$WORK" && cd "$WORK" && WORK=$(pwd)

generate() {
    local item round p g seed
    for item in $PLAN; do
        IFS=: read -r round p g <<<"$item"
        seed=$(( round == 3 ? 1 : 0 ))
        [ -f "gen/$FAM/r$round-p$p-$g/dataset_description.json" ] && continue
        "$PY" -m qsmrim_app.synthetic "gen/$FAM/r$round-p$p-$g" --family "$FAM" --data-dir "$DATA" --patients "$p" \
            --grids "$g" --seed "$seed" --head-cache "$WORK/head" --overwrite
    done
}

participant() {
    local srcs=() item round p g
    for item in $PLAN; do IFS=: read -r round p g <<<"$item"; srcs+=("gen/$FAM/r$round-p$p-$g"); done
    rm -rf "bids/$FAM" && "$PY" "$REPO/scripts/merge_bids.py" "bids/$FAM" "${srcs[@]}" >/dev/null
    "$PY" "$REPO/run.py" "bids/$FAM" "out/$FAM" participant --no-classify --nprocs 1 -w "work/$FAM" \
        --registration-gate-mm 20
}

for stage in $STAGES; do
    echo "== $stage ($(date -u +%FT%TZ))"
    "$stage"
done
echo "== done ($(date -u +%FT%TZ))"
