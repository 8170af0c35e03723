#!/usr/bin/env bash
# Builds the Dockerfile into an image with buildah, where no Docker engine runs (docs/operations.md "Docker").
#   bash scripts/image.sh TAG [buildah bud options]      e.g. bash scripts/image.sh localhost/userexport:dev
# No registry is reached for the FROM image: when container storage has no python:3.11-slim, one is
# made here from Debian bookworm (whose python3 is 3.11) with mmdebstrap, laid out as the official
# image is for this Dockerfile (python, python3, pip on /usr/local/bin; pip free to install system-wide).
# Needs root, buildah, podman (to import the base) and mmdebstrap; scripts/setup.sh installs them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tag=${1:?usage: bash scripts/image.sh TAG [buildah bud options]}
shift
BASE=docker.io/library/python:3.11-slim
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/image.sh: run it as root (buildah's chroot isolation and mmdebstrap need root here)" >&2
  exit 2
fi
for tool in buildah podman mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "scripts/image.sh: $tool is missing (bash scripts/setup.sh installs it)" >&2; exit 2; }
done

# The stand-in base: Debian's python3 and pip with their certificates, minbase otherwise.
make_base() {
  local dir
  dir=$(mktemp -d)
  mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    --customize-hook='for n in python python3; do ln -sf /usr/bin/python3 "$1/usr/local/bin/$n"; done' \
    --customize-hook='for n in pip pip3; do ln -sf /usr/bin/pip3 "$1/usr/local/bin/$n"; done' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    bookworm "$dir/base.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main"
  podman import --quiet \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    --change "LABEL userexport.base-recipe=$1" "$dir/base.tar" "$BASE" >/dev/null
  rm -rf "$dir"
}

# A base made by an older recipe (this function's text is the recipe) is made again; an image of that
# name from elsewhere (no recipe label, e.g. the official one) is used as it is. One maker at a time.
recipe=$(declare -f make_base | sha256sum | cut -c1-16)
exec 9>"${TMPDIR:-/tmp}/userexport-base-image.lock"
flock 9
labels=$(buildah inspect --type image --format '{{.OCIv1.Config.Labels}}' "$BASE" 2>/dev/null || echo missing)
if [ "$labels" = missing ] || { [[ $labels == *userexport.base-recipe:* ]] &&
                                 [[ $labels != *userexport.base-recipe:$recipe* ]]; }; then
  echo "== making $BASE from Debian bookworm (recipe $recipe)"
  make_base "$recipe"
fi
flock -u 9

# The host's CA certificates, for pip in the build stage: where TLS goes through a proxy with its own
# root, Debian's bundle alone fails. /etc/ssl/certs exists in the base, so the mount leaves no trace in
# the image; a mount point that does not (e.g. --volume /etc/pip.conf:/etc/pip.conf:ro, for a private
# index) is left in the layers as an empty file. --format docker keeps the HEALTHCHECK (OCI has none).
mounts=()
if [ -d /etc/ssl/certs ]; then mounts=(--volume /etc/ssl/certs:/etc/ssl/certs:ro); fi
exec buildah bud --isolation chroot --pull=never --format docker --layers "${mounts[@]}" --tag "$tag" "$@" .
