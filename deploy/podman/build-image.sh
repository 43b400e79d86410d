#!/usr/bin/env bash
# Build the modelpool image with podman where no registry is reachable (this sandbox, CI):
#   deploy/podman/build-image.sh [TAG]     (default localhost/modelpool:latest)
# The base comes from Debian's packages (base-image.sh); pip inside the build uses this machine's local wheels
# and CA bundle, mounted read-only, so the CPU torch wheel on this disk installs offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${1:-localhost/modelpool:latest}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"
base=localhost/modelpool-base:bookworm
deploy/podman/base-image.sh "$base"

# docker format: the OCI format has no HEALTHCHECK.
args=(--format docker --network host --build-arg "BASE=$base" --build-arg "TORCH_INDEX=")
cert="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
if [ -f "$cert" ]; then
  args+=(-v "$(dirname "$cert"):$(dirname "$cert"):ro" --build-arg "PIP_CERT=$cert")
fi
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  args+=(-v "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro" --build-arg "PIP_FIND_LINKS=$PIP_FIND_LINKS")
fi
podman build "${args[@]}" -t "$tag" .
