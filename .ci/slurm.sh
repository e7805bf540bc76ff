#!/usr/bin/env bash
# CI stage: qsmrim on a real (one-node, loopback) SLURM cluster.
#
# 1. slurm-wlm + munge (+ GNU time) from apt; when they cannot be installed: a SKIP line and exit 0.
# 2. munged, slurmctld and slurmd started in the foreground from a temp dir (config, keys, state, spool,
#    logs all there); their PIDs are recorded and exactly those are stopped on exit (trap).
# 3. A generated dataset of 2 participants, processed
#    a. with `--use-plugin` SLURMGraph (nipype submits every node as a job with afterok dependencies and
#       returns; the app must wait for those jobs and report their failures),
#    b. with `--use-plugin` SLURM (nipype polls the queue itself),
#    c. with scripts/qsmrim_slurm_array.sh as a 2-task array job on a 2-CPU, 4 GB allocation (venv app),
#       peak memory sampled with sstat and GNU time; memory over the allocation kills the job
#       (JobAcctGatherParams=OverMemoryKill), so completing is the proof that 4 GB suffice;
#    and each output tree is compared with a plain MultiProc run (scripts/compare_derivatives.py).
#
# Env: PYTHON (the venv's python, default .venv/bin/python), QSMRIM_SLURM_KEEP=1 keeps the temp dir,
#      QSMRIM_SLURM_PARTS (default "graph slurm array") picks the parts of step 3 to run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
t0=$SECONDS
stamp() { printf '[slurm %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
skip() { echo "SKIP slurm stage: $*"; exit 0; }
fail() { echo "FAIL slurm stage: $*"; exit 1; }

# ---- 1. tools -------------------------------------------------------------------------------------------
need=()
for tool in slurmctld slurmd munged mungekey sbatch /usr/bin/time; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if ((${#need[@]})); then
    [[ $(id -u) -eq 0 ]] || skip "needs ${need[*]} and is not root to install them"
    stamp "installing slurm-wlm munge time (missing: ${need[*]})"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge time; } \
        >/tmp/qsmrim-ci-slurm-apt.log 2>&1; then
        tail -n 5 /tmp/qsmrim-ci-slurm-apt.log
        skip "apt-get install slurm-wlm munge failed (log: /tmp/qsmrim-ci-slurm-apt.log)"
    fi
fi
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || fail "no venv python at $python (run 'make install' first)"
venv_bin="$(dirname "$python")"

# ---- 2. a one-node cluster in a temp dir ----------------------------------------------------------------
S="$(mktemp -d /tmp/qsmrim-ci-slurm.XXXXXX)"
chmod 755 "$S"
pids=()
cleanup() {
    local rc=$?
    if [[ -n "${SLURM_CONF:-}" ]] && command -v scancel >/dev/null; then
        scancel --full --user "$(id -un)" >/dev/null 2>&1 || true   # only this cluster's jobs (SLURM_CONF)
        sleep 1
    fi
    # Exactly the daemons started here, newest first.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ $rc -ne 0 ]]; then
        for f in "$S"/log/*.log; do [[ -f "$f" ]] && { echo "--- $f"; tail -n 15 "$f"; }; done
    fi
    if [[ "${QSMRIM_SLURM_KEEP:-0}" == 1 ]]; then echo "kept $S"; else rm -rf "$S"; fi
    exit $rc
}
trap cleanup EXIT
mkdir -p "$S"/{munge,state,spool,log,data}
chmod 711 "$S/munge"   # clients need to reach the socket; the key inside stays 0600

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port="$(free_port)"; slurmd_port="$(free_port)"
[[ "$ctld_port" != "$slurmd_port" ]] || slurmd_port=$((slurmd_port + 1))
# slurmd refuses a node whose configured memory exceeds what it finds; take what it reports, less 5 %.
real_mb="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
real_mb=$((real_mb * 95 / 100))
((real_mb >= 4096)) || skip "this machine has ${real_mb} MB for the node; the 4 GB job needs more"
user="$(id -un)"

mungekey --create --keyfile="$S/munge/munge.key" --force >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$S/munge/munge.key"
munged --foreground --force --key-file="$S/munge/munge.key" --socket="$S/munge/munge.socket" \
    --pid-file="$S/munge/munged.pid" --seed-file="$S/munge/munged.seed" --log-file="$S/log/munged.log" \
    >>"$S/log/munged.out" 2>&1 &
pids+=($!)

cat >"$S/slurm.conf" <<EOF
ClusterName=qsmrimci
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge/munge.socket
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
DependencyParameters=kill_invalid_depend
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=localhost NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=2 RealMemory=$real_mb State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$S/slurm.conf"
export LOGNAME="${LOGNAME:-$user}" USER="${USER:-$user}"   # nipype's SLURM plugin reads LOGNAME

for _ in $(seq 50); do [[ -S "$S/munge/munge.socket" ]] && break; sleep 0.2; done
[[ -S "$S/munge/munge.socket" ]] || fail "munged did not start"
slurmctld -D -i -f "$SLURM_CONF" >>"$S/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" -N localhost >>"$S/log/slurmd.out" 2>&1 &
pids+=($!)
state=""
for _ in $(seq 60); do
    state="$(sinfo -h -n localhost -o %T 2>/dev/null || true)"
    [[ "$state" == idle ]] && break
    sleep 1
done
[[ "$state" == idle ]] || fail "node not idle after 60 s (state '${state}')"
stamp "cluster up: slurmctld :$ctld_port, slurmd :$slurmd_port, node localhost CPUs=2 RealMemory=${real_mb}MB"

# ---- 3. data and the reference run ----------------------------------------------------------------------
export OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 NIPYPE_NO_ET=1 PATH="$venv_bin:$PATH"
D="$S/data"
qsmrim-synth "$D/bids" --subjects 2 --seed 7 >/dev/null
# Runs are compared number for number, so the FLAIR->QSM registration runs on one thread (--omp-nthreads 1):
# with several, its metric sums add in varying order and runs differ slightly. Classification needs a model:
# the bundled one, QSMRIM_CI_MODEL, or else a tiny one trained here (seconds) with the app itself.
app_args=(--omp-nthreads 1)
model="${QSMRIM_CI_MODEL:-}"
if [[ -z "$model" ]] && ! "$python" -c 'import sys; from qsmrim_app.config import BUNDLED_MODEL_DIR as d; sys.exit(not (d / "model.json").is_file())'; then
    stamp "no bundled model: training a tiny one (scripts/ci_tiny_model.sh)"
    model="$(scripts/ci_tiny_model.sh "$D/bids" "$D/tiny")"
fi
[[ -z "$model" ]] || app_args+=(--model "$model")
stamp "reference: MultiProc participant run"
qsmrim "$D/bids" "$D/out-ref" participant "${app_args[@]}" --nprocs 2 -w "$D/work-ref" >"$S/log/ref.log" 2>&1 \
    || { tail -n 30 "$S/log/ref.log"; fail "reference run failed"; }

jobs_left() { squeue -h -o %i | wc -l; }
compare() { "$python" scripts/compare_derivatives.py "$D/out-ref" "$1" --min-files 4; }

parts=" ${QSMRIM_SLURM_PARTS:-graph slurm array} "
if [[ "$parts" == *" graph "* ]]; then
# ---- 3a. SLURMGraph -------------------------------------------------------------------------------------
cat >"$D/slurmgraph.yml" <<EOF
plugin: SLURMGraph
plugin_args:
  dont_resubmit_completed_jobs: true
  sbatch_args: --cpus-per-task=1 --mem=2G
EOF
stamp "SLURMGraph participant run"
ts=$SECONDS
qsmrim "$D/bids" "$D/out-graph" participant "${app_args[@]}" --use-plugin "$D/slurmgraph.yml" -w "$D/work-graph" \
    >"$S/log/graph.log" 2>&1 || { tail -n 30 "$S/log/graph.log"; fail "SLURMGraph run failed"; }
left="$(jobs_left)"
[[ "$left" -eq 0 ]] || { squeue; fail "qsmrim returned while $left SLURMGraph jobs were still queued or running"; }
stamp "SLURMGraph: $((SECONDS - ts)) s, $(ls "$D"/work-graph/*/batch/batchscript_*.sh 2>/dev/null | wc -l) jobs"
compare "$D/out-graph"

# A job the scheduler kills (here over its memory: OverMemoryKill, --mem=1M) writes no nipype crash file and
# its dependants are cancelled (kill_invalid_depend): the app must still notice, fail, and leave no jobs.
cat >"$D/slurmgraph-oom.yml" <<EOF
plugin: SLURMGraph
plugin_args:
  sbatch_args: --cpus-per-task=1 --mem=1M
EOF
stamp "SLURMGraph whose jobs the scheduler kills must fail"
rc=0
qsmrim "$D/bids" "$D/out-oom" participant "${app_args[@]}" --use-plugin "$D/slurmgraph-oom.yml" \
    -w "$D/work-oom" >"$S/log/graph-oom.log" 2>&1 || rc=$?
if [[ $rc -eq 0 ]]; then
    tail -n 20 "$S/log/graph-oom.log"
    fail "SLURMGraph run whose jobs were killed (out of memory) exited 0"
fi
[[ "$(jobs_left)" -eq 0 ]] || { squeue; scancel --user "$user"; fail "jobs left behind after a failed SLURMGraph run"; }
stamp "killed jobs: exit code $rc, no jobs left; the app said: $(grep -m1 -E 'ERROR|rror:' "$S/log/graph-oom.log" | cut -c1-200)"
fi

if [[ "$parts" == *" slurm "* ]]; then
# ---- 3b. SLURM ------------------------------------------------------------------------------------------
cat >"$D/slurm.yml" <<EOF
plugin: SLURM
plugin_args:
  sbatch_args: --cpus-per-task=1 --mem=2G
  max_jobs: 2
  poll_sleep_duration: 1
EOF
stamp "SLURM participant run"
ts=$SECONDS
qsmrim "$D/bids" "$D/out-slurm" participant "${app_args[@]}" --use-plugin "$D/slurm.yml" -w "$D/work-slurm" \
    >"$S/log/slurm.log" 2>&1 || { tail -n 30 "$S/log/slurm.log"; fail "SLURM run failed"; }
[[ "$(jobs_left)" -eq 0 ]] || fail "jobs left after the SLURM run"
stamp "SLURM: $((SECONDS - ts)) s"
compare "$D/out-slurm"
fi

if [[ "$parts" == *" array "* ]]; then
# ---- 3c. array script, 2 CPUs + 4 GB per participant ----------------------------------------------------
n="$(($(grep -c . "$D/bids/participants.tsv") - 1))"
stamp "array job: $n tasks, --cpus-per-task=2 --mem=4G"
ts=$SECONDS
# One task at a time (%1): the node has 2 CPUs; each task gets both.
jobid="$(sbatch --parsable --array="1-$n%1" --cpus-per-task=2 --mem=4G --output="$S/log/array-%A_%a.out" \
    --export=ALL,QSMRIM_SCRATCH="$S/spool" scripts/qsmrim_slurm_array.sh "$D/bids" "$D/out-array" "${app_args[@]}")"
peak_sstat=0
while [[ -n "$(squeue -h -j "$jobid" -o %i 2>/dev/null)" ]]; do
    # Job-wide RSS (all processes of the step, summed per sample) while it runs.
    for v in $(sstat -n -a -P -j "$jobid" --format MaxRSS 2>/dev/null | tr -dc '0-9KMG\n'); do
        kb="$(awk -v v="$v" 'BEGIN { n = v + 0; u = substr(v, length(v)); if (u == "M") n *= 1024; else if (u == "G") n *= 1048576; printf "%d", n }')"
        ((kb > peak_sstat)) && peak_sstat=$kb
    done
    sleep 2
done
stamp "array job $jobid: $((SECONDS - ts)) s"
for f in "$D"/out-array/logs/slurm/"${jobid}"_*.tsv; do
    [[ -f "$f" ]] || fail "no per-task exit-code file for job $jobid"
    tail -n 1 "$f"
done
rcs="$(awk -F'\t' 'FNR > 1 { print $2 }' "$D"/out-array/logs/slurm/"${jobid}"_*.tsv | sort -u | tr '\n' ' ')"
nrec="$(ls "$D"/out-array/logs/slurm/"${jobid}"_*.tsv | wc -l)"
[[ "$nrec" -eq "$n" && "$rcs" == "0 " ]] || fail "array tasks: $nrec records, exit codes: $rcs"
peak_time="$(awk -F'\t' 'FNR > 1 && $7 > m { m = $7 } END { print m + 0 }' "$D"/out-array/logs/slurm/"${jobid}"_*.tsv)"
stamp "array: all $n tasks exit 0; peak RSS largest process $((peak_time / 1024)) MB (GNU time), job-wide $((peak_sstat / 1024)) MB (sstat)"
compare "$D/out-array"
fi
stamp "PASS: the runs of [${parts# }] match the MultiProc run"
