#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its development tools (buf, for the
# proto lint, from the npm registry into .tools; from Debian's packages where apt-get is there,
# promtool, which checks the metrics exposition, protoc, whose stock Java generator a test runs, and
# buildah, podman and mmdebstrap, which build and run the Docker image with no Docker engine).
# Sourced by the other scripts; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip runs again only when what it builds from changed since the last install (a stamp holds the hash
# of pyproject.toml, setup.py and the C it compiles).
stamp=".venv/.installed-$(cat pyproject.toml setup.py server/userexport_server/export/_*.[ch] | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # setuptools adds "BuildBackendWarning: Editable installation. Please be careful with folders in
  # your working directory with the same name as your package" to every editable install of a
  # project whose packages sit in more than one folder (client/, server/); nothing in pyproject.toml
  # turns it off (its editable modes all say it). No such folder is here, so the notice is dropped.
  PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
if [ ! -x .tools/node_modules/.bin/buf ] && command -v npm >/dev/null 2>&1; then
  npm install --silent --no-fund --no-audit --prefix .tools @bufbuild/buf@1 >/dev/null
fi
# apt_install COMMAND PACKAGE: Debian's PACKAGE, where COMMAND is missing and apt-get is there.
apt_install() {
  if command -v "$1" >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then return 0; fi
  local sudo
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 ||
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null; } ||
    echo "setup: could not install $1 (package $2); its tests need it under CI" >&2
}
apt_install promtool prometheus
apt_install protoc protobuf-compiler
apt_install buildah buildah
apt_install podman podman
apt_install mmdebstrap mmdebstrap
