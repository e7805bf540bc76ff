# qsmrim BIDS App container.
#
#   docker build -t qsmrim:$(cat version) --build-arg VERSION=$(cat version) \
#       --build-arg VCS_REF=$(git rev-parse --short HEAD) .
#
# BASE_IMAGE must provide `python3` (3.11) with the venv module and a Debian/Ubuntu `apt-get`; both stages
# start from it so the virtual environment built in the first stage runs unchanged in the second.
# The default is CUDA-capable without a CUDA base: the PyPI torch wheel pinned in requirements.txt carries
# its own CUDA runtime and cuDNN (nvidia-* wheels), and the host's NVIDIA driver is injected at run time
# (`docker run --gpus all`, `apptainer run --nv`). Pinned by tag; for bit-for-bit rebuilds pin the digest
# too, e.g. BASE_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest from `docker buildx imagetools inspect`>.
# CI (no registry access) builds this same file on a debootstrapped Debian bookworm base
# (scripts/make_base_image.sh) and hands pip a local CPU torch wheel via PIP_FIND_LINKS.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# Stage 1: compilers, wheels, the virtual environment. Nothing of this stage but /opt/venv is kept.
FROM ${BASE_IMAGE} AS builder

# Extra local wheel folder(s) for pip (CI: a CPU torch wheel mounted read-only); empty = PyPI only.
ARG PIP_FIND_LINKS=""
# A CA bundle for pip where the build network's TLS is intercepted (CI: the host's bundle, mounted); empty =
# the base image's certificates.
ARG PIP_CERT=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# gcc/g++ for the sdists without wheels (pyradiomics-bhklab builds its C extension from source); the Python
# headers only where the base lacks them (Debian's system python keeps them in python3-dev).
RUN set -eux; \
    pkgs="gcc g++"; \
    inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"; \
    [ -f "$inc/Python.h" ] || pkgs="$pkgs python3-dev"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first (pinned), so editing the app's code does not rebuild them.
COPY requirements.txt /tmp/build/requirements.txt
RUN set -eux; \
    if [ -n "$PIP_FIND_LINKS" ]; then export PIP_FIND_LINKS; else unset PIP_FIND_LINKS; fi; \
    if [ -n "$PIP_CERT" ]; then export PIP_CERT; else unset PIP_CERT; fi; \
    python -m pip install --upgrade pip setuptools wheel; \
    python -m pip install -r /tmp/build/requirements.txt; \
    chmod -R a+rX,go-w /opt/venv

# The app itself as a wheel, installed in the runtime stage on top of the unchanged venv: editing the app
# then rebuilds a small layer instead of copying the whole venv again.
COPY setup.cfg pyproject.toml README.md version run.py /tmp/build/src/
COPY qsmrim_app /tmp/build/src/qsmrim_app
RUN set -eux; \
    python -m pip wheel --no-deps --no-build-isolation -w /opt/dist /tmp/build/src; \
    mkdir -p /opt/qsmrim; \
    cp /tmp/build/src/version /tmp/build/src/run.py /opt/qsmrim/; \
    chmod -R a+rX,go-w /opt/qsmrim /opt/dist; \
    chmod a+x /opt/qsmrim/run.py; \
    rm -rf /tmp/build

# ---------------------------------------------------------------------------------------------------------
# Stage 2: runtime. No compilers, no package lists, a non-root user.
FROM ${BASE_IMAGE} AS runtime

# The dependencies (the big layer) first: it stays cached while requirements.txt is unchanged. Layers that
# change with every build (revision, date labels) come last for the same reason.
COPY --from=builder /opt/venv /opt/venv

ARG VERSION=unknown
ARG IMAGE_NAME=qsmrim/qsmrim

# Threads: 1 unless the app's --omp-nthreads says otherwise (it sets them per process at run time; one ITK
# thread also keeps the registration bit-for-bit repeatable); nipype
# must not phone home (the container also runs with --network none); matplotlib and every other cache go to
# /tmp because the image may run --read-only with only a tmpfs /tmp writable, as any UID:GID.
# QSMRIM_CONTAINER names this image in the derivatives' dataset_description.json (GeneratedBy.Container).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    NIPYPE_NO_ET=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    QSMRIM_VERSION=${VERSION} \
    QSMRIM_CONTAINER=docker://${IMAGE_NAME}:${VERSION}

# The app (pure-Python wheel, no index, no compiler), then a named non-root user for the default; any other
# --user UID:GID works too (nothing needs a passwd entry, every writable path is under /tmp). The build ends
# by running the entrypoint once.
COPY --from=builder /opt/qsmrim /opt/qsmrim
COPY --from=builder /opt/dist /opt/dist
RUN set -eux; \
    /opt/venv/bin/python3 -m pip install --no-deps --no-index --no-cache-dir /opt/dist/*.whl; \
    rm -rf /opt/dist; \
    groupadd --gid 1000 qsmrim; \
    useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin qsmrim; \
    /opt/venv/bin/python3 /opt/qsmrim/run.py --version

ARG VCS_REF=unknown
ARG BUILD_DATE=""
ARG SOURCE_URL=https://github.com/qsmrim/qsmrim
LABEL org.opencontainers.image.title="qsmrim" \
      org.opencontainers.image.description="BIDS App: chronic active (rim+) MS lesions on QSM (QSMRim-Net)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0"

USER qsmrim
WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/python3", "/opt/qsmrim/run.py"]
