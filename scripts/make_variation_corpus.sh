#!/bin/bash
# The corpora of the families that use the generator's variations (docs/families.md: warp, own TV
# inversions of real tissue fields, FLAIR voxel draws, rims on small lesions): `warped-tv`, `tv-ich-a`,
# `cosmos-tv-mixed`, `ich-b-small`, `cosmos-small`. Each is
# made and run through the app the way scripts/make_bundled_model.sh makes its other families: every
# patient on the family's two grids (rounds 1-2, seed 0) and on grids the family does not otherwise use
# (round 3, seed 1); one merged BIDS dataset per family; the participant level with --no-classify (gate
# opened: the semi-real QSM and FLAIR are two people, docs/registration.md).
#
#   scripts/make_variation_corpus.sh WORKDIR [STAGE...]     STAGE: generate participant
#
# Outputs: WORKDIR/bids/<family> (merged BIDS, participants relabelled sub-<prefix>NN so that the families
# merge with the others', whose sub-NN are the Ljubljana patients), WORKDIR/out/<family> (participant
# level). FAMILIES picks the families (default all five; e.g. FAMILIES=tv-ich-a to make one on each core);
# PY (default .venv/bin/python) runs both; DATA defaults to ../shared/data. The patients also carry other families'
# lesions (all 20 Ljubljana patients are in the bundled corpus): a left-out family shares lesion shapes,
# not rim physics, background reconstruction or grid.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:?usage: $0 WORKDIR [STAGE...]}
shift
STAGES=${*:-generate participant}
PY=${PY:-$REPO/.venv/bin/python}
DATA=${DATA:-$REPO/../shared/data}
FAMILIES=${FAMILIES:-warped-tv tv-ich-a cosmos-tv-mixed ich-b-small cosmos-small}
# family: round:patient:grid ...
declare -A PLAN=(
  [warped-tv]="1:1:0.9x0.9x2 1:4:1x1x3 2:1:1x1x3 2:4:0.9x0.9x2 2:12:0.9x0.9x2 2:16:1x1x3
               3:1:0.75x0.75x3 3:4:1x1x1 3:12:0.6x0.6x2 3:16:0.75x0.75x3"
  [tv-ich-a]="1:3:1x1x3 1:14:0.6x0.6x2 2:3:0.6x0.6x2 2:14:1x1x3 2:18:1x1x3 2:5:0.6x0.6x2
              3:3:0.9x0.9x2 3:14:1x1x1 3:18:0.75x0.75x3 3:5:1x1x3"
  [cosmos-tv-mixed]="1:9:0.75x0.75x3 1:19:1x1x1 2:9:1x1x1 2:19:0.75x0.75x3 2:20:1x1x1 2:10:0.75x0.75x3
                     3:9:0.9x0.9x2 3:19:1x1x3 3:20:0.6x0.6x2 3:10:0.9x0.9x2"
  [ich-b-small]="1:6:1x1x1 1:20:0.9x0.9x2 2:6:0.9x0.9x2 2:20:1x1x1 2:11:1x1x1 2:16:0.9x0.9x2
                 3:6:0.75x0.75x3 3:20:0.6x0.6x2 3:11:0.6x0.6x2 3:16:0.75x0.75x3"
  [cosmos-small]="1:1:0.6x0.6x2 1:4:0.75x0.75x3 2:1:0.75x0.75x3 2:4:0.6x0.6x2 2:12:0.6x0.6x2 2:5:0.75x0.75x3
                  3:1:1x1x1 3:4:0.9x0.9x2 3:12:1x1x3 3:5:1x1x1"
)
declare -A PREFIX=([warped-tv]=wt [tv-ich-a]=ta [cosmos-tv-mixed]=ct [ich-b-small]=sb [cosmos-small]=cs)
mkdir -p "$WORK" && cd "$WORK" && WORK=$(pwd)

generate() {
    local fam item round p g seed
    for fam in $FAMILIES; do
        for item in ${PLAN[$fam]}; do
            IFS=: read -r round p g <<<"$item"
            seed=$(( round == 3 ? 1 : 0 ))
            [ -f "gen/$fam/r$round-p$p-$g/dataset_description.json" ] && continue
            "$PY" -m qsmrim_app.synthetic "gen/$fam/r$round-p$p-$g" --family "$fam" --data-dir "$DATA" \
                --patients "$p" --grids "$g" --seed "$seed" --head-cache "$WORK/head" --overwrite
        done
    done
}

participant() {
    local fam srcs item round p g
    for fam in $FAMILIES; do
        [ -f "out/$fam/.done" ] && continue
        srcs=()
        for item in ${PLAN[$fam]}; do IFS=: read -r round p g <<<"$item"; srcs+=("gen/$fam/r$round-p$p-$g:${PREFIX[$fam]}"); done
        rm -rf "bids/$fam" && "$PY" "$REPO/scripts/merge_bids.py" "bids/$fam" "${srcs[@]}" >/dev/null
        "$PY" "$REPO/run.py" "bids/$fam" "out/$fam" participant --no-classify --nprocs 1 -w "work/$fam" \
            --registration-gate-mm 20
        touch "out/$fam/.done"
    done
}

for stage in $STAGES; do
    echo "== $stage ($(date -u +%FT%TZ))"
    "$stage"
done
echo "== done ($(date -u +%FT%TZ))"
