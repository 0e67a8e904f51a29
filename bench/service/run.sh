#!/usr/bin/env bash
# bench/service/run.sh BUILD OUT [--quick]: the `service` benchmark, called by
# bench/run.sh service. Starts kvstored on 127.0.0.1 (ephemeral port, data in
# a temp dir) and, in the same run, redis-server as the Ping baseline; writes
# OUT as {"bench","metrics","rows"} (bench/run.sh adds command/machine/date).
#
# Headline metrics (../shared/BENCH.md): search_p50_us, search_p99_us
# (1 layer, 32 query heads, 8 KV heads, head_dim 128, bf16, top-100, 32K
# context, one request at a time, default ranking; a row repeats it ranked
# by centroid only), ping_ops_per_s and redis_ping_ops_per_s
# (one connection, pipeline 64, both over TCP loopback), ping_ratio_vs_redis,
# append_gb_s (K+V bytes per second, 1024-token appends, pipeline 4, sync
# batch; also as append_gb_s_batch) and append_gb_s_async (kvstored --sync
# async, same appends; _flushed counts the final Flush).
# Client and servers share this machine's cores: the numbers include that.
set -euo pipefail
build=$1; out=$2; shift 2
quick=false
for a in "$@"; do [ "$a" = --quick ] && quick=true; done

if $quick; then
    ping_n=200000; search_n=100; append_n=32; ctx=8192
else
    ping_n=1000000; search_n=1000; append_n=128; ctx=32768
fi

tmp=$(mktemp -d)
kvs_pid=; redis_pid=
cleanup() {
    [ -n "$kvs_pid" ] && kill "$kvs_pid" 2>/dev/null && wait "$kvs_pid" 2>/dev/null || true
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

"$build/server/kvstored" --bind 127.0.0.1 --port 0 --http-bind "" \
    --port-file "$tmp/port" --data-dir "$tmp/data" --workers 2 \
    --log-level warn 2>"$tmp/kvstored.log" &
kvs_pid=$!
for _ in $(seq 200); do [ -s "$tmp/port" ] && break; sleep 0.05; done
port=$(awk '/^port/ {print $2}' "$tmp/port")
kvctl() { "$build/client/kvctl" --addr "127.0.0.1:$port" --json "$@"; }

geo=(--q-heads 32 --kv-heads 8 --head-dim 128 --dtype bf16)
rows="$tmp/rows.jsonl"
: >"$rows"
for p in 1 16 64; do
    n=$ping_n; [ "$p" = 1 ] && n=$((ping_n / 10))
    kvctl bench --op ping --requests "$n" --pipeline "$p" \
        | sed "s/^{/{\"server\":\"kvstored\",/" >>"$rows"
done
kvctl bench --op search --requests "$search_n" --pipeline 1 --context "$ctx" \
    --k 100 "${geo[@]}" | sed "s/^{/{\"server\":\"kvstored\",\"context\":$ctx,\"rank\":\"default\",/" >>"$rows"
# The same searches ranked by centroid only (the default before key codes),
# a row beside the headline so that a change of the default shows as such.
kvctl bench --op search --requests "$search_n" --pipeline 1 --context "$ctx" \
    --k 100 --rank centroid "${geo[@]}" | sed "s/^{/{\"server\":\"kvstored\",\"context\":$ctx,\"rank\":\"centroid\",/" >>"$rows"
kvctl bench --op append --requests "$append_n" --pipeline 4 --tokens 1024 \
    "${geo[@]}" | sed "s/^{/{\"server\":\"kvstored\",\"sync\":\"batch\",/" >>"$rows"
kill "$kvs_pid"; wait "$kvs_pid" || true; kvs_pid=

# The same appends with write-behind (--sync async): acknowledged once
# queued; the bench's final Flush (flush_s) is what the disk still owed.
rm -f "$tmp/port"
"$build/server/kvstored" --bind 127.0.0.1 --port 0 --http-bind "" \
    --port-file "$tmp/port" --data-dir "$tmp/data-async" --workers 2 \
    --sync async --log-level warn 2>>"$tmp/kvstored.log" &
kvs_pid=$!
for _ in $(seq 200); do [ -s "$tmp/port" ] && break; sleep 0.05; done
port=$(awk '/^port/ {print $2}' "$tmp/port")
kvctl bench --op append --requests "$append_n" --pipeline 4 --tokens 1024 \
    "${geo[@]}" | sed "s/^{/{\"server\":\"kvstored\",\"sync\":\"async\",/" >>"$rows"
kill "$kvs_pid"; wait "$kvs_pid" || true; kvs_pid=

# Redis baseline, same machine, same run, same connection/pipeline shapes.
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$rport" --save "" --appendonly no \
    --daemonize no >"$tmp/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
for p in 1 16 64; do
    n=$ping_n; [ "$p" = 1 ] && n=$((ping_n / 10))
    redis-benchmark -h 127.0.0.1 -p "$rport" -t ping -n "$n" -c 1 -P "$p" --csv \
        | python3 -c '
import csv, json, sys
p = int(sys.argv[1])
for r in csv.DictReader(sys.stdin):
    print(json.dumps({"server": "redis", "op": r["test"].lower(), "pipeline": p,
                      "ops_per_s": float(r["rps"]),
                      "p50_us": float(r.get("p50_latency_ms", "nan")) * 1000}))
' "$p" >>"$rows"
done

python3 - "$rows" "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def pick(**kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None
m = {}
s = pick(server="kvstored", op="search", rank="default")
if s and s.get("ok"):
    m["search_p50_us"] = round(s["p50_us"], 1)
    m["search_p99_us"] = round(s["p99_us"], 1)
k = pick(server="kvstored", op="ping", pipeline=64)
# redis-benchmark -t ping runs PING_INLINE and PING_MBULK; the faster one is
# the baseline.
rb = [r for r in rows if r["server"] == "redis" and r["pipeline"] == 64]
if k and k.get("ok"):
    m["ping_ops_per_s"] = round(k["ops_per_s"])
if rb:
    m["redis_ping_ops_per_s"] = round(max(r["ops_per_s"] for r in rb))
if "ping_ops_per_s" in m and "redis_ping_ops_per_s" in m:
    m["ping_ratio_vs_redis"] = round(m["ping_ops_per_s"] / m["redis_ping_ops_per_s"], 3)
a = pick(server="kvstored", op="append", sync="batch")
if a and a.get("ok"):
    m["append_gb_s"] = round(a["gb_per_s"], 3)
    m["append_gb_s_batch"] = round(a["gb_per_s"], 3)
a = pick(server="kvstored", op="append", sync="async")
if a and a.get("ok"):
    m["append_gb_s_async"] = round(a["gb_per_s"], 3)
    m["append_gb_s_async_flushed"] = round(a["gb_per_s_flushed"], 3)
json.dump({"bench": "service", "metrics": m, "rows": rows}, open(sys.argv[2], "w"), indent=2)
PY
