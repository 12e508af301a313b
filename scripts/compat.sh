#!/usr/bin/env bash
# Compatibility checks with the vendors' real Python clients: makes a virtualenv at .venv,
# installs requirements-compat.txt, builds the debug `drplane` binary, starts a local
# cluster with `drplane dev` (three nodes in three sites, two `fs` agents host-1/site-1 and
# host-2/site-2 with the demo inventory, the demo user's credentials for every family),
# and runs pytest over compat/ against it. The tests get:
#   DRPLANE_URL             the first node's base URL (DRPLANE_URLS: every node, comma-separated)
#   DRPLANE_ADMIN_PASSWORD  the password of user `admin`
#   DRPLANE_DEV_DIR         the dev directory (credentials.json, agent-i/ data, logs)
#   DRPLANE_BIN             the binary (tests may start more agents with `drplane agent`)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/drplane-target}"

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-compat.txt

cargo build -p drplane-node
export DRPLANE_BIN="$CARGO_TARGET_DIR/debug/drplane"

work=$(mktemp -d -t drplane-compat-XXXXXX)
# A base port whose 3 HTTP ports, 3 Raft ports and agent ports are free, away from dev's 7000.
base=$(.venv/bin/python - <<'PY'
import random, socket
for _ in range(200):
    b = random.randrange(32000, 60000, 1000)
    ok = True
    for p in [b + i for i in range(1, 4)] + [b + 100 + i for i in range(1, 4)] + [b + 200 + i for i in range(1, 3)]:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            ok = False
        finally:
            s.close()
    if ok:
        print(b)
        break
PY
)
export DRPLANE_DEV_DIR="$work/dev"
DRPLANE_LOG="${DRPLANE_LOG:-info,openraft=warn}" "$DRPLANE_BIN" dev --dir "$DRPLANE_DEV_DIR" \
  --base-port "$base" >"$work/dev.out" 2>&1 &
dev=$!
cleanup() {
  kill -INT "$dev" 2>/dev/null || true
  wait "$dev" 2>/dev/null || true
  if [ "${status:-1}" -eq 0 ]; then rm -rf "$work"; else echo "compat: logs kept in $work (dev.out, dev/node-*.log, dev/agent-*.log)"; fi
}
trap cleanup EXIT

for _ in $(seq 1 1200); do
  grep -q "drplane dev: ready" "$work/dev.out" 2>/dev/null && break
  kill -0 "$dev" 2>/dev/null || { echo "compat: drplane dev exited:"; cat "$work/dev.out"; exit 1; }
  sleep 0.1
done
grep -q "drplane dev: ready" "$work/dev.out" || { echo "compat: drplane dev not ready in 120 s:"; cat "$work/dev.out"; exit 1; }
DRPLANE_ADMIN_PASSWORD=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin_password"])' "$DRPLANE_DEV_DIR/credentials.json")
export DRPLANE_ADMIN_PASSWORD
export DRPLANE_URL="http://127.0.0.1:$((base + 1))"
export DRPLANE_URLS="http://127.0.0.1:$((base + 1)),http://127.0.0.1:$((base + 2)),http://127.0.0.1:$((base + 3))"

set +e
.venv/bin/python -m pytest compat "$@"
status=$?
set -e
exit $status
