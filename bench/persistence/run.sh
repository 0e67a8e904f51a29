#!/usr/bin/env bash
# bench/persistence/run.sh BUILD OUT [--quick] [args]: the `persistence`
# benchmark, called by bench/run.sh persistence. persist_bench measures
# append rates, restart and space amplification; then the persistence test's
# SIGKILL loop (which fails on any lost acknowledged append) gives the crash
# rounds (200, or 20 with --quick).
set -euo pipefail
build=$1; out=$2; shift 2
quick=false
for a in "$@"; do [ "$a" = --quick ] && quick=true; done

"$build/bench/persistence/persist_bench" --json "$out" "$@"
rounds=200
$quick && rounds=20
crash_log=$(mktemp)
trap 'rm -f "$crash_log"' EXIT
if KVS_CRASH_ROUNDS=$rounds "$build/tests/persist/test_persist" >"$crash_log" 2>&1; then
    lost=0
else
    lost=unknown
    cat "$crash_log" >&2
fi
python3 - "$out" "$rounds" "$lost" "$crash_log" <<'PY'
import json, re, sys
path, rounds, lost, log = sys.argv[1:]
r = json.load(open(path))
text = open(log).read()
m = re.search(r"crash rounds: (\d+), tokens acknowledged (\d+) \+ (\d+)", text)
if m and lost == "0":
    r["metrics"]["crash_rounds"] = int(m.group(1))
    r["metrics"]["lost_acknowledged"] = 0
    r["rows"].append({"crash_rounds": int(m.group(1)),
                      "acknowledged_tokens": int(m.group(2)) + int(m.group(3)),
                      "lost_acknowledged": 0})
json.dump(r, open(path, "w"))
PY
