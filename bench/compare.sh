#!/usr/bin/env bash
# compare.sh -- drplane's write path against etcd 3.4 on this machine, interleaved
# (etcd, drplane, etcd, drplane, ...), with the same load tool (wrk + wrk_unique_kv.lua),
# the same connection counts and durations, and the disk's fdatasync latency beside them.
#
#   bench/compare.sh                         # 3 rounds, c=1 and c=256, 10 s each
#   ROUNDS=3 DURATION=10 WARMUP=3 CONNS="1 256" FAILOVER_TRIALS=20 bench/compare.sh
#
# Needs: a release build (cargo build --release -p drplane-node), and
# apt-get install -y etcd-server etcd-client wrk fio. Never run in CI.
# Writes everything under $OUT (default: a new temp dir) and prints a summary table.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$(cd "$ROOT/../shared/bench" && pwd)}
BIN=${DRPLANE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/drplane-target}/release/drplane}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-"1 256"}
FAILOVER_TRIALS=${FAILOVER_TRIALS:-20}
BASE_PORT=${BASE_PORT:-7600}
OUT=${OUT:-$(mktemp -d -t drplane-compare.XXXXXX)}
mkdir -p "$OUT"

[[ -x "$BIN" ]] || { echo "no release binary at $BIN: cargo build --release -p drplane-node" >&2; exit 1; }
for tool in wrk fio etcd curl python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y etcd-server etcd-client wrk fio)" >&2; exit 1; }
done
log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/run.log" >&2; }

fsync_floor() {  # label dir
  timeout 30 fio --name=fdatasync --directory="$2" --rw=write --ioengine=sync --fdatasync=1 \
    --bs=2300 --size=4600k --runtime=8 --output-format=json > "$OUT/fio-$1.json" 2>/dev/null || true
  rm -f "$2"/fdatasync*
  python3 - "$OUT/fio-$1.json" <<'PY'
import json, sys
try:
    p = json.load(open(sys.argv[1]))["jobs"][0]["sync"]["lat_ns"]["percentile"]
    print("fdatasync p50 %.3f ms p99 %.3f ms" % (p["50.000000"] / 1e6, p["99.000000"] / 1e6))
except Exception as e:  # noqa: BLE001
    print(f"fdatasync: no figure ({e})")
PY
}

DEV_PID=""
stop_drplane() {
  if [[ -n "$DEV_PID" ]] && kill -0 "$DEV_PID" 2>/dev/null; then
    kill -INT "$DEV_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$DEV_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DEV_PID" 2>/dev/null || true
  fi
  DEV_PID=""
}
trap stop_drplane EXIT

drplane_round() {  # round
  local r=$1 dir
  dir=$(mktemp -d -t drplane-bench.XXXXXX)
  "$BIN" dev --dir "$dir" --base-port "$BASE_PORT" > "$OUT/drplane-dev-$r.out" 2>&1 &
  DEV_PID=$!
  for _ in $(seq 600); do grep -q 'drplane dev: ready' "$OUT/drplane-dev-$r.out" && break; sleep 0.1; done
  grep -q 'drplane dev: ready' "$OUT/drplane-dev-$r.out" || { log "drplane dev did not get ready"; cat "$OUT/drplane-dev-$r.out" >&2; exit 1; }
  local leader token
  token=$(DRPLANE_ENDPOINT="http://127.0.0.1:$((BASE_PORT + 1))" DRPLANE_USER=admin \
    DRPLANE_PASSWORD=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin_password"])' "$dir/credentials.json") \
    "$BIN" identity login)
  leader=$(curl -s -H "X-Auth-Token: $token" "http://127.0.0.1:$((BASE_PORT + 1))/drplane/v1/cluster" \
    | python3 -c 'import json,sys; j=json.load(sys.stdin); print([m["http"] for m in j["members"] if m["leader"]][0])')
  log "drplane round $r: leader http $leader; $(fsync_floor "drplane-$r" "$dir")"
  for c in $CONNS; do
    local t=$(( c < 2 ? c : 2 ))
    WRK_AUTH_TOKEN="$token" WRK_PATH=/drplane/v1/sites WRK_BODY='{"name":"{{key}}","description":"{{value}}"}' \
      wrk -t"$t" -c"$c" -d"${WARMUP}s" --timeout 10s --latency -s "$HERE/wrk_unique_kv.lua" \
      "http://$leader" -- put "warm$r-c$c" > "$OUT/drplane-warm-$r-c$c.txt" 2>&1 || true
    WRK_AUTH_TOKEN="$token" WRK_PATH=/drplane/v1/sites WRK_BODY='{"name":"{{key}}","description":"{{value}}"}' \
      wrk -t"$t" -c"$c" -d"${DURATION}s" --timeout 10s --latency -s "$HERE/wrk_unique_kv.lua" \
      "http://$leader" -- put "r$r-c$c" > "$OUT/drplane-put-$r-c$c.txt" 2>&1 || true
    log "drplane put c=$c: $(grep WRK_RESULT "$OUT/drplane-put-$r-c$c.txt" || echo FAILED)"
  done
  stop_drplane
  rm -rf "$dir"
}

etcd_round() {  # round
  local r=$1
  ( cd "$SHARED" && OUT_DIR="$OUT/etcd-$r" DURATION="$DURATION" WARMUP="$WARMUP" CONNS="$CONNS" \
      FAILOVER_TRIALS=3 ./etcd_anchor.sh > "$OUT/etcd-$r.out" 2>&1 ) || log "etcd round $r failed (see $OUT/etcd-$r.out)"
  for c in $CONNS; do
    log "etcd put c=$c: $(grep WRK_RESULT "$OUT/etcd-$r/wrk-put-c$c.txt" 2>/dev/null || echo FAILED)"
  done
  log "etcd round $r: $(python3 -c 'import json,sys;p=json.load(open(sys.argv[1]))["jobs"][0]["sync"]["lat_ns"]["percentile"];print("fdatasync p50 %.3f ms p99 %.3f ms"%(p["50.000000"]/1e6,p["99.000000"]/1e6))' "$OUT/etcd-$r/fio-start.json" 2>/dev/null || echo 'no floor')"
}

for r in $(seq "$ROUNDS"); do
  etcd_round "$r"
  drplane_round "$r"
done

log "failover: $FAILOVER_TRIALS trials of leader kill -> next acknowledged write"
"$BIN" bench failover --trials "$FAILOVER_TRIALS" --base-port $((BASE_PORT + 300)) > "$OUT/drplane-failover.txt" 2>&1 || log "failover bench failed"
tail -n 8 "$OUT/drplane-failover.txt" | tee -a "$OUT/run.log" >&2

python3 - "$OUT" "$ROUNDS" "$CONNS" <<'PY'
import json, re, statistics, sys, glob
out, rounds, conns = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def result(path):
    try:
        for line in open(path):
            if line.startswith("WRK_RESULT "):
                return json.loads(line[11:])
    except OSError:
        return None
print(f"\nresults in {out} (medians of {rounds} interleaved rounds)\n")
print("| load | etcd ok writes/s | drplane ok writes/s | ratio | etcd p50 / p99 ms | drplane p50 / p99 ms |")
print("|---|---:|---:|---:|---:|---:|")
for c in conns:
    e = [result(f"{out}/etcd-{r}/wrk-put-c{c}.txt") for r in range(1, rounds + 1)]
    d = [result(f"{out}/drplane-put-{r}-c{c}.txt") for r in range(1, rounds + 1)]
    e = [x for x in e if x]; d = [x for x in d if x]
    if not e or not d:
        print(f"| c={c} | missing | missing | | | |"); continue
    med = lambda xs, k: statistics.median(x[k] for x in xs)
    print(f"| writes, {c} conn | {med(e,'ok_rps'):,.0f} | {med(d,'ok_rps'):,.0f} | {med(d,'ok_rps')/med(e,'ok_rps'):.2f}x "
          f"| {med(e,'p50_ms'):.2f} / {med(e,'p99_ms'):.2f} | {med(d,'p50_ms'):.2f} / {med(d,'p99_ms'):.2f} |")
PY
