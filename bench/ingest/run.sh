#!/usr/bin/env bash
# bench/ingest/run.sh BUILD OUT [--quick]: the `ingest` benchmark (issue
# #14), called by bench/run.sh ingest. Appends through kvstored over TCP
# loopback with bench/ingest/ingest_bench (libkvsclient), Llama-3-8B layer
# geometry (8 KV heads x head_dim 128, bf16: 4 KiB of K+V per token and
# layer), 1024-token appends, chunked-prefill order (each chunk of the
# prompt appended layer by layer), 8 in flight, data directory on /tmp
# (deleted after each run).
#
# Headline metrics:
#   append_gb_s          --sync async (write-behind; the fastest acknowledged
#                        mode), 8 layers x 8K tokens (256 MiB), no index wait
#   append_gb_s_batch    the same appends with --sync batch (group fsync)
#   append_gb_s_always   the same appends with --sync always (fsync each)
#   append_gb_s_warm     async, as the second burst on one daemon
#   prefill_32k_llama8b_s  32 layers x 32K tokens (4 GiB) with --sync async
#                        and a lag bound that holds it: time until every
#                        append is acknowledged and every segment is built
#                        (index builds included); rows add the time until
#                        the first search is answered (queryable) and
#                        until the Flush barrier returns (durable).
# Each row carries kvstored's CPU seconds and its copies per byte (the
# /metrics counters kvstored_append_copied_bytes_total over
# kvstored_append_payload_bytes_total). With KVS_INGEST_BASELINE=DIR (a
# build of another commit) the async rate is measured with that kvstored
# too, in the same run. The 32K prefill's timeline becomes
# bench/results/ingest_prefill.png (gnuplot, bench/ingest/plot.gp).
set -euo pipefail
build=$1; out=$2; shift 2
quick=false
for a in "$@"; do [ "$a" = --quick ] && quick=true; done
here=$(cd "$(dirname "$0")" && pwd)

if $quick; then
    rate_layers=4; rate_tokens=4096; pf_layers=4; pf_tokens=8192
else
    rate_layers=8; rate_tokens=8192; pf_layers=32; pf_tokens=32768
fi

tmp=$(mktemp -d /tmp/kvs-ingest.XXXXXX)
kvs_pid=
cleanup() {
    [ -n "$kvs_pid" ] && kill "$kvs_pid" 2>/dev/null && wait "$kvs_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# start_kvstored BUILD SYNC [extra flags]: sets port, http_port, kvs_pid.
start_kvstored() {
    local b=$1 sync=$2; shift 2
    rm -rf "$tmp/data" "$tmp/port"
    "$b/server/kvstored" --bind 127.0.0.1 --port 0 --http-bind 127.0.0.1 \
        --http-port 0 --port-file "$tmp/port" --data-dir "$tmp/data" \
        --workers 2 --sync "$sync" --log-level warn "$@" \
        2>>"$tmp/kvstored.log" &
    kvs_pid=$!
    for _ in $(seq 400); do [ -s "$tmp/port" ] && grep -q http_port "$tmp/port" && break; sleep 0.05; done
    port=$(awk '/^port/ {print $2}' "$tmp/port")
    http_port=$(awk '/^http_port/ {print $2}' "$tmp/port")
}

# stop_kvstored LABEL SYNC: appends kvstored's CPU time and copy counters
# to the last row, then stops it.
stop_kvstored() {
    local label=$1 sync=$2
    local cpu
    cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' /proc/$kvs_pid/stat)
    curl -s "http://127.0.0.1:$http_port/metrics" >"$tmp/metrics.txt" || true
    python3 - "$tmp/row.json" "$label" "$sync" "$cpu" "$tmp/metrics.txt" >>"$tmp/rows.jsonl" <<'PY'
import json, sys
row = json.loads(open(sys.argv[1]).read())
row["label"], row["sync"] = sys.argv[2], sys.argv[3]
row["kvstored_cpu_s"] = float(sys.argv[4])
m = {}
for line in open(sys.argv[5]).read().splitlines():
    if line.startswith("kvstored_append"):
        k, v = line.rsplit(" ", 1)
        m[k] = float(v)
pay = m.get("kvstored_append_payload_bytes_total", 0)
if pay:
    rd = m.get('kvstored_append_copied_bytes_total{stage="reader"}', 0)
    dc = m.get('kvstored_append_copied_bytes_total{stage="decode"}', 0)
    row["copies_per_byte_reader"] = round(rd / pay, 4)
    row["copies_per_byte_decode"] = round(dc / pay, 4)
    row["appends_in_place"] = m.get("kvstored_appends_in_place_total", 0)
if row.get("bytes"):
    row["gb_per_kvstored_cpu_s"] = round(row["bytes"] / 1e9 / max(row["kvstored_cpu_s"], 1e-9), 4)
print(json.dumps(row))
PY
    kill "$kvs_pid"; wait "$kvs_pid" || true; kvs_pid=
}

: >"$tmp/rows.jsonl"
rate() { # rate BUILD LABEL SYNC
    start_kvstored "$1" "$3"
    "$build/bench/ingest/ingest_bench" --addr "127.0.0.1:$port" \
        --layers $rate_layers --tokens $rate_tokens --chunk 1024 --pipeline 8 \
        --no-index-wait --label "$2" >"$tmp/row.json"
    stop_kvstored "$2" "$3"
}

# rate_warm BUILD LABEL SYNC: the same appends as a second burst on one
# daemon (the first burst, a sequence dropped after it, is not counted): a
# long-running daemon's rate, where a fresh one first faults in the memory
# its queue batches, tails and memtables take (on this VM the first write
# to a page costs ~4 ns per byte, 0.25 GB/s, against ~13 GB/s warm).
rate_warm() {
    start_kvstored "$1" "$3"
    "$build/bench/ingest/ingest_bench" --addr "127.0.0.1:$port" \
        --layers $rate_layers --tokens $rate_tokens --chunk 1024 --pipeline 8 \
        --no-index-wait --label warmup >/dev/null
    sleep 1.1 # the next burst's sequence id is the clock's
    "$build/bench/ingest/ingest_bench" --addr "127.0.0.1:$port" \
        --layers $rate_layers --tokens $rate_tokens --chunk 1024 --pipeline 8 \
        --no-index-wait --label "$2" >"$tmp/row.json"
    stop_kvstored "$2" "$3"
}

if [ -n "${KVS_INGEST_BASELINE:-}" ]; then
    rate "$KVS_INGEST_BASELINE" baseline async
    rate_warm "$KVS_INGEST_BASELINE" baseline_warm async
fi
rate "$build" rate async
rate_warm "$build" warm async
rate "$build" rate batch
rate "$build" rate always
# Frames under 256 KiB (32-token appends, 128 KiB) take the general path:
# read into the shared buffer and unpacked by protobuf-c, as every append
# did before issue #14; the same counters measure that path's copies.
start_kvstored "$build" async
"$build/bench/ingest/ingest_bench" --addr "127.0.0.1:$port" \
    --layers $rate_layers --tokens $((rate_tokens / 4)) --chunk 32 \
    --pipeline 8 --no-index-wait --label small_frames >"$tmp/row.json"
stop_kvstored small_frames async

# The 32K prefill: 4 GiB queued at most (it fits this machine's memory
# twice over: tails, then segments; the queue's copy) so that acknowledging
# waits for memory, not the disk; the Flush then says what the disk owed.
start_kvstored "$build" async --max-unpersisted-bytes 4G
"$build/bench/ingest/ingest_bench" --addr "127.0.0.1:$port" \
    --layers $pf_layers --tokens $pf_tokens --chunk 1024 --pipeline 8 \
    --timeline "$tmp/timeline.dat" --label prefill >"$tmp/row.json"
stop_kvstored prefill async

if command -v gnuplot >/dev/null; then
    # bench/run.sh writes OUT to a temp file: the PNG goes to bench/results
    # (a --quick run keeps the full run's plot).
    png=${KVS_INGEST_PNG:-$here/../results/ingest_prefill.png}
    $quick && png=${KVS_INGEST_PNG:-$tmp/ingest_prefill.png}
    python3 "$here/bins.py" "$tmp/timeline.dat" "$tmp/row.json" \
        "$tmp/bins.dat" "$tmp/progress.dat" "$tmp/marks.dat"
    gnuplot -e "binfile='$tmp/bins.dat'; progress='$tmp/progress.dat'; marks='$tmp/marks.dat'; outfile='$png'; title_text='Llama-3-8B prefill through kvstored: $pf_layers layers x $pf_tokens tokens, bf16, sync async (2 shared, loaded cores)'" \
        "$here/plot.gp" || echo "ingest: gnuplot failed" >&2
fi
[ -n "${KVS_INGEST_TIMELINE:-}" ] && cp "$tmp/timeline.dat" "$KVS_INGEST_TIMELINE"

python3 - "$tmp/rows.jsonl" "$out" "$quick" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
m = {}
def pick(label, sync):
    for r in rows:
        if r["label"] == label and r["sync"] == sync and not r["errors"]:
            return r
for sync, key in (("async", "append_gb_s"), ("batch", "append_gb_s_batch"),
                  ("always", "append_gb_s_always")):
    r = pick("rate", sync)
    if r:
        m[key] = round(r["gb_s"], 4)
r = pick("rate", "async")
if r and "copies_per_byte_reader" in r:
    m["copies_per_byte_server"] = round(r["copies_per_byte_reader"] + r["copies_per_byte_decode"], 4)
r = pick("small_frames", "async")
if r and "copies_per_byte_reader" in r:
    m["copies_per_byte_server_small_frames"] = round(r["copies_per_byte_reader"] + r["copies_per_byte_decode"], 4)
r = pick("warm", "async")
if r:
    m["append_gb_s_warm"] = round(r["gb_s"], 4)
r = pick("baseline_warm", "async")
if r:
    m["append_gb_s_warm_baseline"] = round(r["gb_s"], 4)
b = pick("baseline", "async")
if b:
    m["append_gb_s_baseline"] = round(b["gb_s"], 4)
    if "copies_per_byte_reader" in b:
        m["copies_per_byte_server_baseline"] = round(b["copies_per_byte_reader"] + b["copies_per_byte_decode"], 4)
p = pick("prefill", "async")
if p and p["indexed_s"] >= 0:
    m["prefill_32k_llama8b_s"] = p["indexed_s"]
    m["prefill_32k_acked_s"] = p["acked_s"]
    m["prefill_32k_queryable_s"] = p["first_search_s"]
    m["prefill_32k_flushed_s"] = p["flushed_s"]
json.dump({"bench": "ingest", "metrics": m, "rows": rows}, open(sys.argv[2], "w"), indent=2)
PY
