#!/usr/bin/env bash
# The test command: installs what the build lacks, then runs every test of the workspace:
# unit tests, openraft's storage suite, the API tests, the real-process cluster tests,
# then the compatibility suite with the vendors' Python clients.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drplane-target}"
scripts/install-deps.sh
cargo build --workspace --all-targets
# Test binaries run one after another; the cluster tests inside each run their own
# processes, so limit threads to keep two cores from starving elections.
cargo test --workspace -- --test-threads=2
# The vendors' real Python clients against a real node (virtualenv in .venv, pinned in
# requirements-compat.txt).
scripts/compat.sh -q
