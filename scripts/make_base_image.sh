#!/usr/bin/env bash
# Make a Debian bookworm base image (Python 3.11 + venv) with debootstrap and import it into podman.
#
# Why: on CI machines without registry access no base image can be pulled, yet the real Dockerfile must be
# built and run. Debian bookworm's python3 is 3.11, the same minor version as the default BASE_IMAGE, so the
# image built on top of this base exercises the same Dockerfile steps.
#
# Usage: scripts/make_base_image.sh [IMAGE]   (default localhost/qsmrim-base:bookworm; needs root)
# Env:   DEBIAN_MIRROR (default http://deb.debian.org/debian)
# Cached: when IMAGE already exists in podman's storage nothing is done.
set -euo pipefail

image="${1:-localhost/qsmrim-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if podman image exists "$image"; then
    echo "base image $image: cached in podman storage"
    exit 0
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/qsmrim-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT

echo "base image $image: debootstrap bookworm into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# The Dockerfile runs apt-get update itself; shipped package lists and caches only add size.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

tar --numeric-owner -C "$rootfs" -c . | podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >/dev/null
echo "base image $image: imported ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
