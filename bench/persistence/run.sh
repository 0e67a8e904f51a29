#!/usr/bin/env bash
# bench/persistence/run.sh BUILD OUT [--quick] [args]: the `persistence`
# benchmark, called by bench/run.sh persistence. persist_bench measures
# append rates, restart and space amplification; then the persistence test's
# SIGKILL loop (which fails on any lost acknowledged append) gives the crash
# rounds (200, or 20 with --quick); test_async's SIGKILL loops give the
# write-behind rounds (async: nothing before the last flush or the reported
# persisted_seqno lost; batch: no acknowledged append lost), 50 each or 10
# with --quick. The restart store is kept for kvstored_ready.py: seconds
# from starting kvstored on it to READY=1, per --load mode (eager: before
# issue 14), added as rows. Then the restart of a 4-layer store (131072
# tokens a layer, 8192 with --quick), whose first attend reads one layer of
# four, and block_touch (which K/V pages a wave attend reads: the unit of
# stored K/V blocks), both added as rows.
set -euo pipefail
build=$1; out=$2; shift 2
quick=false
for a in "$@"; do [ "$a" = --quick ] && quick=true; done

store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT
rmdir "$store" # persist_bench builds it
"$build/bench/persistence/persist_bench" --json "$out" --store "$store" "$@"
ready_log=$(mktemp)
trap 'rm -rf "$store" "$ready_log"' EXIT
if [ -x "$build/server/kvstored" ]; then
    python3 "$(dirname "$0")/kvstored_ready.py" "$build/server/kvstored" \
        "$store" warm lazy eager >"$ready_log"
fi
rm -rf "$store"
layers_store=$(mktemp -d)
layers_json=$(mktemp)
touch_json=$(mktemp)
trap 'rm -rf "$store" "$ready_log" "$layers_store" "$layers_json" "$touch_json"' EXIT
rmdir "$layers_store"
layer_tokens=131072
touch_segments=64
if $quick; then layer_tokens=8192; touch_segments=16; fi
"$build/bench/persistence/persist_bench" --restart-only --layers 4 \
    --tokens "$layer_tokens" --store "$layers_store" --json "$layers_json"
rm -rf "$layers_store"
"$build/bench/persistence/block_touch" --segments "$touch_segments" \
    --queries 16 --json "$touch_json"
rounds=200
$quick && rounds=20
crash_log=$(mktemp)
trap 'rm -f "$crash_log" "$ready_log" "$layers_json" "$touch_json"' EXIT
if KVS_CRASH_ROUNDS=$rounds "$build/tests/persist/test_persist" >"$crash_log" 2>&1; then
    lost=0
else
    lost=unknown
    cat "$crash_log" >&2
fi
async_rounds=50
$quick && async_rounds=10
async_log=$(mktemp)
trap 'rm -f "$crash_log" "$async_log" "$ready_log" "$layers_json" "$touch_json"' EXIT
if KVS_CRASH_ROUNDS=$async_rounds "$build/tests/persist/test_async" >"$async_log" 2>&1; then
    async_lost=0
else
    async_lost=unknown
    cat "$async_log" >&2
fi
python3 - "$out" "$rounds" "$lost" "$crash_log" "$async_lost" "$async_log" "$ready_log" "$layers_json" "$touch_json" <<'PY'
import json, re, sys
path, rounds, lost, log, async_lost, async_log, ready_log, layers_json, touch_json = sys.argv[1:]
r = json.load(open(path))
for row in json.load(open(layers_json))["rows"]:
    if "load" in row:
        r["rows"].append(row)
        if row["load"] == "warm":
            r["metrics"]["first_attend_after_restart_ms_4_layers"] = \
                row["first_attend_after_restart_ms"]
            r["metrics"]["restart_resident_s_4_layers"] = row["resident_s"]
touch = json.load(open(touch_json))
touch["block_touch"] = True
r["rows"].append(touch)
r["metrics"]["wave_attend_kv_pages_read_pct"] = touch["pages_read_pct"]
for line in open(ready_log):
    row = json.loads(line)
    row["kvstored_ready"] = True
    r["rows"].append(row)
    if row["load"] in ("warm", "eager") and row["ready_s"] is not None:
        key = "kvstored_ready_s" + ("" if row["load"] == "warm" else "_eager")
        r["metrics"][key] = row["ready_s"]
text = open(log).read()
m = re.search(r"crash rounds: (\d+), tokens acknowledged (\d+) \+ (\d+)", text)
if m and lost == "0":
    r["metrics"]["crash_rounds"] = int(m.group(1))
    r["metrics"]["lost_acknowledged"] = 0
    r["rows"].append({"crash_rounds": int(m.group(1)),
                      "acknowledged_tokens": int(m.group(2)) + int(m.group(3)),
                      "lost_acknowledged": 0})
text = open(async_log).read()
for mode in ("async", "batch"):
    m = re.search(mode + r" crash rounds: (\d+), durable tokens (\d+) \+ (\d+)",
                  text)
    if m and async_lost == "0":
        # async: "durable" is what a completed flush or the stats'
        # persisted_seqno had covered when the process was killed.
        r["metrics"]["crash_rounds_" + mode] = int(m.group(1))
        r["metrics"]["lost_acknowledged_" + mode] = 0
        r["rows"].append({"sync": mode, "crash_rounds": int(m.group(1)),
                          "durable_tokens": int(m.group(2)) + int(m.group(3)),
                          "lost": 0,
                          "lost_counts": "acknowledged appends" if mode == "batch"
                          else "appends before the last flush or persisted_seqno"})
json.dump(r, open(path, "w"))
PY
