#!/usr/bin/env bash
#SBATCH --job-name=qsmrim
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --output=qsmrim-%A_%a.out
#
# qsmrim on SLURM: one participant per array task, participants taken from <bids_dir>/participants.tsv.
#
#   n=$(( $(wc -l < /data/bids/participants.tsv) - 1 ))     # participants (the first line is the header)
#   sbatch --array=1-$n scripts/qsmrim_slurm_array.sh /data/bids /data/derivatives/qsmrim [qsmrim options...]
#   # then, once every task has finished:
#   qsmrim /data/bids /data/derivatives/qsmrim group       # or: apptainer run ... group
#
# Array task i processes the i-th data row of participants.tsv (column participant_id). Resources come from
# the allocation: --nprocs and --omp-nthreads = SLURM_CPUS_PER_TASK, --mem-gb = the job's memory.
#
# Environment (all optional):
#   QSMRIM_SIF            an Apptainer image: run it (apptainer run --cleanenv, --nv when a GPU is visible)
#                         with the dataset bound read-only; otherwise `qsmrim` must be on PATH (e.g. a venv).
#   QSMRIM_APPTAINER      the apptainer command (default: apptainer, else singularity)
#   QSMRIM_SCRATCH        node-local scratch for the work dir (default: $TMPDIR, else /tmp); the work dir is
#                         removed when the task succeeds and kept (path in the log) when it fails.
#   QSMRIM_KEEP_WORK=1    keep the work dir even on success.
#
# Exit codes are collected per task in <output_dir>/logs/slurm/<array job>_<task>.tsv (participant_id,
# exit_code, host, start, end, seconds, peak_rss_kb); the task exits with qsmrim's exit code, so
# `sacct -j <job>` and dependent jobs (--dependency=afterok) see failures too.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p' >&2; exit 64; }
[[ $# -ge 2 ]] || usage
bids_dir="$(cd "$1" && pwd)"
out_dir="$2"
shift 2
task="${SLURM_ARRAY_TASK_ID:?run through sbatch --array (SLURM_ARRAY_TASK_ID is not set)}"
job="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-manual}}"

# ---- the participant of this task ----------------------------------------------------------------------
tsv="$bids_dir/participants.tsv"
[[ -r "$tsv" ]] || { echo "qsmrim array: no $tsv" >&2; exit 66; }
participant="$(awk -F'\t' -v row="$task" '
    NR == 1 { for (i = 1; i <= NF; i++) if ($i == "participant_id") col = i; if (!col) exit 2; next }
    NF && NR - 1 == row { print $col; exit }' "$tsv")" || { echo "qsmrim array: $tsv has no participant_id column" >&2; exit 65; }
[[ -n "$participant" ]] || { echo "qsmrim array: task $task is past the last row of $tsv" >&2; exit 65; }
label="${participant#sub-}"

# ---- resources from the allocation ---------------------------------------------------------------------
nprocs="${SLURM_CPUS_PER_TASK:-1}"
mem_args=()
if [[ -n "${SLURM_MEM_PER_NODE:-}" ]]; then          # MB; leave ~10 % for the Python processes themselves
    mem_args=(--mem-gb "$(awk -v m="$SLURM_MEM_PER_NODE" 'BEGIN { printf "%.1f", m * 0.9 / 1024 }')")
elif [[ -n "${SLURM_MEM_PER_CPU:-}" ]]; then
    mem_args=(--mem-gb "$(awk -v m="$SLURM_MEM_PER_CPU" -v n="$nprocs" 'BEGIN { printf "%.1f", m * n * 0.9 / 1024 }')")
fi

# ---- node-local work dir -------------------------------------------------------------------------------
scratch="${QSMRIM_SCRATCH:-${TMPDIR:-/tmp}}"
work="$(mktemp -d "$scratch/qsmrim-work-${job}_${task}.XXXXXX")"
mkdir -p "$out_dir/logs/slurm"
out_dir="$(cd "$out_dir" && pwd)"
record="$out_dir/logs/slurm/${job}_${task}.tsv"
timing="$work/.time"

# ---- run -----------------------------------------------------------------------------------------------
app_args=(participant --participant-label "$label" --nprocs "$nprocs" --omp-nthreads "$nprocs" "${mem_args[@]}" "$@")
if [[ -n "${QSMRIM_SIF:-}" ]]; then
    apptainer="${QSMRIM_APPTAINER:-$(command -v apptainer || command -v singularity || echo apptainer)}"
    gpu=()
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]] || command -v nvidia-smi >/dev/null 2>&1; then gpu=(--nv); fi
    cmd=("$apptainer" run --cleanenv "${gpu[@]}" -B "$bids_dir:/data:ro" -B "$out_dir:/out" -B "$work:/work"
         "$QSMRIM_SIF" /data /out "${app_args[@]}" -w /work)
else
    qsmrim="$(command -v qsmrim)" || { echo "qsmrim array: no qsmrim on PATH and QSMRIM_SIF unset" >&2; exit 127; }
    cmd=("$qsmrim" "$bids_dir" "$out_dir" "${app_args[@]}" -w "$work/work")
fi
# The app's thread settings win over whatever the login environment exported.
export OMP_NUM_THREADS="$nprocs" MKL_NUM_THREADS="$nprocs" NIPYPE_NO_ET=1
echo "qsmrim array: task $task -> $participant on $(hostname) (nprocs=$nprocs ${mem_args[*]}) work=$work"
echo "qsmrim array: ${cmd[*]}"
start="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
t0=$SECONDS
rc=0
if [[ -x /usr/bin/time ]]; then        # GNU time: peak RSS of the largest process of the run
    /usr/bin/time -f '%M' -o "$timing" "${cmd[@]}" || rc=$?
else
    "${cmd[@]}" || rc=$?
fi
peak_kb="$(tail -n 1 "$timing" 2>/dev/null | tr -dc '0-9')"
printf 'participant_id\texit_code\thost\tstart\tend\tseconds\tpeak_rss_kb\n%s\t%d\t%s\t%s\t%s\t%d\t%s\n' \
    "$participant" "$rc" "$(hostname)" "$start" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$((SECONDS - t0))" \
    "${peak_kb:-n/a}" >"$record.tmp"
mv "$record.tmp" "$record"

if [[ $rc -eq 0 && "${QSMRIM_KEEP_WORK:-0}" != 1 ]]; then
    rm -rf "$work"
else
    echo "qsmrim array: exit code $rc; work dir kept at $(hostname):$work"
fi
exit "$rc"
