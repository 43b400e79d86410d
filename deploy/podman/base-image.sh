#!/usr/bin/env bash
# A Debian bookworm base image with python3, built from Debian's packages (no registry needed):
#   deploy/podman/base-image.sh [TAG]      (default localhost/modelpool-base:bookworm)
# then: podman build --build-arg BASE=localhost/modelpool-base:bookworm ...
set -euo pipefail
tag="${1:-localhost/modelpool-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if podman image exists "$tag"; then
  echo "base-image: $tag exists"
  exit 0
fi
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "base-image: built $tag"
