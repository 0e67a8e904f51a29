#!/usr/bin/env bash
# scripts/demo-service.sh [BUILD_DIR]: a two-minute tour of kvstored and kvctl
# on loopback: start the daemon (ephemeral ports, data in a temp dir), create
# a sequence, append and search through the wire protocol, read /metrics,
# stop it with SIGTERM, restart it on the same data and show that the
# sequence survived. Everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
for b in "$build/server/kvstored" "$build/client/kvctl"; do
    [ -x "$b" ] || { echo "demo: $b not built (cmake --build $build --target kvstored kvctl)" >&2; exit 2; }
done
dir=$(mktemp -d)
pid=
stop() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" || true; pid=; }
trap 'stop; rm -rf "$dir"' EXIT

start() {
    rm -f "$dir/port"
    "$build/server/kvstored" --bind 127.0.0.1 --port "${1:-0}" --http-port 0 \
        --port-file "$dir/port" --data-dir "$dir/data" 2>>"$dir/kvstored.log" &
    pid=$!
    for _ in $(seq 200); do [ -s "$dir/port" ] && break; sleep 0.05; done
    port=$(awk '/^port/ {print $2}' "$dir/port")
    http=$(awk '/^http_port/ {print $2}' "$dir/port")
}
kvctl() { echo "+ kvctl $*"; "$build/client/kvctl" --addr "127.0.0.1:$port" "$@"; }

start
echo "kvstored pid $pid on 127.0.0.1:$port (metrics on :$http), data in $dir/data"
kvctl ping --count 100
kvctl create 42 --layers 1 --q-heads 32 --kv-heads 8 --head-dim 128 --dtype bf16
kvctl append 42 --tokens 4096
kvctl append 42 --tokens 4096
# bench runs on scratch sequences of its own and drops them afterwards.
kvctl bench --op append --requests 16 --pipeline 4 --tokens 1024
kvctl bench --op search --requests 200 --pipeline 1 --context 16384 --k 100
kvctl bench --op ping --requests 200000 --pipeline 64
kvctl info 42
kvctl --json stats
echo "+ curl /metrics (excerpt)"
python3 - "$http" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode()
for line in body.splitlines():
    if line.startswith(("kvstored_requests_total", "kvstore_sequences", "kvstore_ram_bytes",
                        "kvstored_request_duration_seconds_count")):
        print("  " + line)
PY
echo "+ SIGTERM, restart on the same data directory and port"
stop
start "$port"
kvctl list
kvctl info 42
kvctl drop 42
stop
echo "daemon log:"; sed 's/^/  /' "$dir/kvstored.log" | grep -v "level=debug" | tail -12
