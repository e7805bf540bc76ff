#!/usr/bin/env bash
# CI stage: build the real Dockerfile with podman and run the image like a user would.
#
# 1. podman + runc + debootstrap (apt-get); when they cannot be installed: a SKIP line and exit 0.
# 2. Base image: Debian bookworm (python 3.11) by debootstrap, imported into podman (registries are out of
#    reach here); cached in podman's storage, so later runs reuse it.
# 3. `podman build` of ./Dockerfile with BASE_IMAGE=<that image>; pip's wheel cache is a host folder
#    (QSMRIM_CI_CACHE) and podman keeps its layers, so a warm run rebuilds only what changed.
# 4. Checks: --version equals ./version; no compiler in the final image; labels; non-root user.
# 5. A generated dataset (2 participants): participant + group level in the venv and in the container
#    (--read-only, tmpfs /tmp, --network none, --user 1000:1000 and an arbitrary UID:GID), then the two
#    output trees are compared (TSVs, NIfTI arrays, NPZ arrays, JSON) by scripts/compare_derivatives.py.
#
# Env: QSMRIM_CI_CACHE (default /var/cache/qsmrim-ci), QSMRIM_IMAGE (default localhost/qsmrim:<version>),
#      QSMRIM_BASE_IMAGE (default localhost/qsmrim-base:bookworm), PYTHON (the venv's python, default
#      .venv/bin/python), QSMRIM_CONTAINER_BUILD_ONLY=1 to stop after step 4.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
t0=$SECONDS
stamp() { printf '[container %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
skip() { echo "SKIP container stage: $*"; exit 0; }

# ---- 1. tools -------------------------------------------------------------------------------------------
need=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if ((${#need[@]})); then
    [[ $(id -u) -eq 0 ]] || skip "needs ${need[*]} and is not root to install them"
    stamp "installing ${need[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap; } \
        >/tmp/qsmrim-ci-apt.log 2>&1; then
        tail -n 5 /tmp/qsmrim-ci-apt.log
        skip "apt-get install podman runc debootstrap failed (log: /tmp/qsmrim-ci-apt.log)"
    fi
fi
[[ $(id -u) -eq 0 ]] || skip "debootstrap and the podman setup used here need root"

python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || { echo "FAIL: no venv python at $python (run 'make install' first)"; exit 1; }
venv_bin="$(dirname "$python")"
version="$(tr -d '[:space:]' <version)"
image="${QSMRIM_IMAGE:-localhost/qsmrim:$version}"
base="${QSMRIM_BASE_IMAGE:-localhost/qsmrim-base:bookworm}"
cache="${QSMRIM_CI_CACHE:-/var/cache/qsmrim-ci}"
mkdir -p "$cache/pip"
# runc: crun fails on this machine's cgroup setup. Low ulimits: podman's defaults exceed what is allowed here.
podman=(podman --runtime runc)
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

# ---- 2. base image --------------------------------------------------------------------------------------
stamp "base image $base"
scripts/make_base_image.sh "$base"

# ---- 3. build -------------------------------------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version"
            --build-arg "VCS_REF=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
            --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
            --build-arg "IMAGE_NAME=${image%:*}")
volumes=(-v "$cache/pip:/root/.cache/pip")
# The host's pip finds a local CPU torch wheel in /opt/wheels (pip config: find-links); hand it to the build
# read-only so no CUDA wheels are downloaded. The host's file:///opt/pypi extra indexes are not needed:
# every pinned requirement is on PyPI, reached through --network host.
if [[ -d /opt/wheels ]]; then
    volumes+=(-v /opt/wheels:/opt/wheels:ro)
    build_args+=(--build-arg PIP_FIND_LINKS=/opt/wheels)
fi
# TLS to the package index may be intercepted here: the host's pip trusts its own CA bundle (pip config
# global.cert / PIP_CERT); the build's pip gets the same bundle, read-only.
host_cert="${PIP_CERT:-$("$python" -m pip config get global.cert 2>/dev/null || true)}"
if [[ -n "$host_cert" && -f "$host_cert" ]]; then
    volumes+=(-v "$host_cert:/opt/host-ca.crt:ro")
    build_args+=(--build-arg PIP_CERT=/opt/host-ca.crt)
fi
stamp "building $image"
tb=$SECONDS
build() {
    nice "${podman[@]}" build --network host "${limits[@]}" "${volumes[@]}" "${build_args[@]}" -f Dockerfile "$@" . \
        >>/tmp/qsmrim-ci-build.log 2>&1 || { tail -n 40 /tmp/qsmrim-ci-build.log; exit 1; }
}
: >/tmp/qsmrim-ci-build.log
# The builder stage gets a tag of its own: its layers (the pip install, minutes) are then not dangling and
# survive the prune below, so the next run reuses them unless requirements.txt or the Dockerfile changed.
build --target builder -t "${image%:*}-builder:cache"
build -t "$image"
podman image prune -f >/dev/null    # layers of earlier builds that nothing uses any more
stamp "built $image in $((SECONDS - tb)) s, size $(podman image inspect --format '{{.Size}}' "$image") bytes"

# ---- 4. image checks ------------------------------------------------------------------------------------
run=("${podman[@]}" run --rm "${limits[@]}" --network none --read-only --tmpfs /tmp:rw,exec,size=2g)
got="$("${run[@]}" "$image" --version | awk '{print $NF}')"
[[ "$got" == "$version" ]] || { echo "FAIL: image --version says '$got', version file says '$version'"; exit 1; }
stamp "--version = $got (matches ./version)"
if "${run[@]}" --entrypoint /bin/sh "$image" -c 'command -v gcc || command -v cc || command -v g++'; then
    echo "FAIL: a compiler is present in the final image"; exit 1
fi
user="$(podman image inspect --format '{{.Config.User}}' "$image")"
[[ -n "$user" && "$user" != root && "$user" != 0 ]] || { echo "FAIL: image runs as '$user'"; exit 1; }
label="$(podman image inspect --format '{{index .Labels "org.opencontainers.image.version"}}' "$image")"
[[ "$label" == "$version" ]] || { echo "FAIL: label version '$label' != '$version'"; exit 1; }
stamp "no compiler, user '$user', OCI version label $label"
if [[ "${QSMRIM_CONTAINER_BUILD_ONLY:-0}" == 1 ]]; then stamp "build-only: done"; exit 0; fi

# ---- 5. same run in the venv and in the container -------------------------------------------------------
tmp="$(mktemp -d /tmp/qsmrim-ci-container.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 NIPYPE_NO_ET=1
"$venv_bin/qsmrim-synth" "$tmp/bids" --subjects 2 --seed 7 >/dev/null
chmod -R a+rX "$tmp"
# Runs are compared number for number, so the FLAIR->QSM registration runs on one thread (--omp-nthreads 1):
# with several, its metric sums add in varying order and runs differ slightly. Classification needs a model:
# the bundled one, QSMRIM_CI_MODEL, or else a tiny one trained here (seconds) with the app itself; the
# container gets it read-only at /model.
app_args=(--omp-nthreads 1)
model="${QSMRIM_CI_MODEL:-}"
if [[ -z "$model" ]] && ! "$python" -c 'import sys; from qsmrim_app.config import BUNDLED_MODEL_DIR as d; sys.exit(not (d / "model.json").is_file())'; then
    stamp "no bundled model: training a tiny one (scripts/ci_tiny_model.sh)"
    model="$(PATH="$venv_bin:$PATH" scripts/ci_tiny_model.sh "$tmp/bids" "$tmp/tiny")"
    chmod -R a+rX "$tmp/tiny"
fi
venv_model=() ctr_model=() model_mount=()
if [[ -n "$model" ]]; then
    venv_model=(--model "$model") ctr_model=(--model /model) model_mount=(-v "$model:/model:ro")
fi

stamp "venv: participant + group"
tv=$SECONDS
"$venv_bin/qsmrim" "$tmp/bids" "$tmp/out-venv" participant "${app_args[@]}" "${venv_model[@]}" --nprocs 2 -w "$tmp/work-venv" >"$tmp/venv.log" 2>&1 \
    || { tail -n 40 "$tmp/venv.log"; exit 1; }
"$venv_bin/qsmrim" "$tmp/bids" "$tmp/out-venv" group >>"$tmp/venv.log" 2>&1 || { tail -n 40 "$tmp/venv.log"; exit 1; }
stamp "venv run took $((SECONDS - tv)) s"

container_run() {  # $1 = UID:GID, $2 = output name
    local ids="$1" name="$2"
    mkdir -p "$tmp/$name" "$tmp/work-$name"
    chown "$ids" "$tmp/$name" "$tmp/work-$name"
    local mounts=(-v "$tmp/bids:/data:ro" -v "$tmp/$name:/out" -v "$tmp/work-$name:/work" "${model_mount[@]}")
    "${run[@]}" --user "$ids" "${mounts[@]}" "$image" /data /out participant "${app_args[@]}" "${ctr_model[@]}" --nprocs 2 -w /work \
        >"$tmp/$name.log" 2>&1 || { tail -n 40 "$tmp/$name.log"; return 1; }
    "${run[@]}" --user "$ids" "${mounts[@]}" "$image" /data /out group -w /work \
        >>"$tmp/$name.log" 2>&1 || { tail -n 40 "$tmp/$name.log"; return 1; }
}
stamp "container (--read-only --network none --user 1000:1000): participant + group"
tc=$SECONDS
container_run 1000:1000 out-ctr
stamp "container run took $((SECONDS - tc)) s"
"$python" scripts/compare_derivatives.py "$tmp/out-venv" "$tmp/out-ctr" --min-files 6
stamp "container as an arbitrary user 4242:4242: participant + group"
container_run 4242:4242 out-ctr-anyuid
"$python" scripts/compare_derivatives.py "$tmp/out-venv" "$tmp/out-ctr-anyuid" --min-files 6
# The derivatives name the image they were made with (QSMRIM_CONTAINER -> GeneratedBy[0].Container).
tag="$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["GeneratedBy"][0].get("Container", {}).get("Tag", ""))' \
    "$tmp/out-ctr/dataset_description.json")"
[[ "$tag" == "$image" ]] || { echo "FAIL: GeneratedBy.Container.Tag is '$tag', expected '$image'"; exit 1; }
stamp "dataset_description.json: GeneratedBy.Container.Tag = $tag"
stamp "PASS: container build, checks and outputs identical to the venv run"
