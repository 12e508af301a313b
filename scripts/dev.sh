#!/usr/bin/env bash
# The local cluster command: installs what the build lacks, builds drplane and runs three
# nodes on 127.0.0.1:7001-7003 with data under ./.drplane-dev until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drplane-target}"
scripts/install-deps.sh
cargo build -p drplane-node
exec "$CARGO_TARGET_DIR/debug/drplane" dev "$@"
