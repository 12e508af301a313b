#!/usr/bin/env bash
# Compatibility checks with the vendors' real Python clients: makes a virtualenv at .venv,
# installs requirements-compat.txt, builds the debug `drplane` binary, starts a one-node
# cluster (DRPLANE_ADMIN_PASSWORD set, initialized), and runs pytest over compat/ against
# it (DRPLANE_URL, DRPLANE_ADMIN_PASSWORD). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drplane-target}"

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-compat.txt

cargo build -p drplane-node
export DRPLANE_BIN="$CARGO_TARGET_DIR/debug/drplane"

work=$(mktemp -d -t drplane-compat-XXXXXX)
port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(port)
raft_port=$(port)
export DRPLANE_ADMIN_PASSWORD="compat-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(12))')"
export DRPLANE_URL="http://127.0.0.1:$http_port"

DRPLANE_LOG="${DRPLANE_LOG:-info,openraft=warn}" "$DRPLANE_BIN" server --id 1 --site compat \
  --http "127.0.0.1:$http_port" --raft "127.0.0.1:$raft_port" --data "$work/data" \
  >"$work/node.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  if [ "${status:-1}" -eq 0 ]; then rm -rf "$work"; else echo "compat: node log kept in $work/node.log"; fi
}
trap cleanup EXIT

for _ in $(seq 1 300); do
  if .venv/bin/python -c "import sys,urllib.request; urllib.request.urlopen('$DRPLANE_URL/livez', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$server" 2>/dev/null || { echo "compat: drplane exited; see $work/node.log"; exit 1; }
  sleep 0.1
done
.venv/bin/python - <<PY
import json, urllib.request
req = urllib.request.Request("$DRPLANE_URL/drplane/v1/cluster/init", method="POST")
with urllib.request.urlopen(req, timeout=30) as r:
    assert r.status == 200, r.status
PY

set +e
.venv/bin/python -m pytest compat "$@"
status=$?
set -e
exit $status
