#!/bin/bash
# The domain-randomised corpus of docs/families.md and its leave-one-family-out benchmark, end to end.
#
#   scripts/make_family_corpus.sh WORKDIR [STAGE...]     STAGE: generate participant lofo
#
# Sized for a 2-core machine shared by several people (12 sessions). Each family gets its own Ljubljana patients (no lesion shape is in two families), one QSM grid per patient
# alternating over the family's grids. Needs the shared data (DATA, default ../shared/data) and the app
# (BIN, default the repository's .venv/bin). BLIND=OUT_DIR adds a participant-level output of the blind family
# (qsmrim_app/synthetic/blind) as a test-only family. METHODS / LOFO_ARGS override the benchmark's methods
# and recipe options (e.g. LOFO_ARGS="--folds 2" on a busy machine; the JSON records what was used).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:?usage: $0 WORKDIR [STAGE...]}
shift
STAGES=${*:-generate participant lofo}
BIN=${QSMRIM_BIN:-$REPO/.venv/bin}
DATA=${DATA:-$REPO/../shared/data}
NPROCS=${NPROCS:-1}
METHODS=${METHODS:-qsmrimnet,shell-core,logreg,rf,aprl-rf,features-only}
mkdir -p "$WORK" && cd "$WORK" && WORK=$(pwd)
# family: patient:grid ...
declare -A PLAN=(
  [semireal]="4:0.75x0.75x3 9:1x1x1"
  [cosmos-faint]="13:1x1x3 1:0.75x0.75x3 17:1x1x3"
  [ich-a-strong]="7:0.9x0.9x2 6:1x1x1"
  [ich-b-mixed]="8:1x1x3 20:0.75x0.75x3 2:1x1x3"
  [cosmos-thick]="11:1x1x1 12:0.6x0.6x2"
)

for stage in $STAGES; do
  echo "== $stage ($(date -u +%FT%TZ))"
  for fam in "${!PLAN[@]}"; do
    case $stage in
      generate)
        srcs=()
        for pg in ${PLAN[$fam]}; do
          p=${pg%%:*}; g=${pg#*:}
          "$BIN/qsmrim-synth" "gen/$fam/p$p" --family "$fam" --data-dir "$DATA" --patients "$p" --grids "$g" \
              --head-cache "$WORK/head" --overwrite
          srcs+=("gen/$fam/p$p")
        done
        rm -rf "bids/$fam" && "$BIN/python" "$REPO/scripts/merge_bids.py" "bids/$fam" "${srcs[@]}" ;;
      participant)
        "$BIN/qsmrim" "bids/$fam" "out/$fam" participant --no-classify --nprocs "$NPROCS" -w "work/$fam" ;;
    esac
  done
  if [ "$stage" = lofo ]; then
    args=()
    for fam in "${!PLAN[@]}"; do args+=(--family "$fam=out/$fam"); done
    [ -n "${BLIND:-}" ] && args+=(--test-family "blind=$BLIND")
    "$BIN/python" "$REPO/benchmarks/bench_families.py" "${args[@]}" --methods "$METHODS" --protocol fast \
        ${LOFO_ARGS:-} --in-family --work "$WORK/lofo" --out "$WORK/families.json" \
        --predictions "$WORK/families_predictions.tsv"
  fi
done
