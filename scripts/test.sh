#!/usr/bin/env bash
# Runs every test: installs the test dependencies (scripts/test-deps.sh), then the whole
# workspace's tests with every backend compiled in (wgpu runs on Mesa's lavapipe when there is
# no GPU). Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test service server::`).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin=$("$root/scripts/test-deps.sh")
export FAKE_GCS_SERVER="$bin/fake-gcs-server"
export MIDAS_TEST_PYTHON="$bin/python"
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
export CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}
exec cargo test --release --workspace --all-features "$@"
