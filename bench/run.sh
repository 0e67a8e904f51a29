#!/usr/bin/env bash
# bench/run.sh NAME [--quick] [extra args]: run one benchmark and write
# bench/results/NAME.json in the format of ../shared/BENCH.md (the program
# prints the metrics and rows; this script adds command, machine and date).
# --quick is a smoke run of well under a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/run.sh NAME [--quick]" >&2; exit 2; }
name=$1; shift
build=${KVS_BENCH_BUILD:-build}

if [ -z "${KVS_BENCH_NO_BUILD:-}" ]; then
    bash scripts/install-deps.sh
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    cmake --build "$build" -j "$(nproc)" >/dev/null
fi

mkdir -p bench/results
out=bench/results/$name.json
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT

cpu=$(lscpu 2>/dev/null | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}')
machine="$(nproc)-core $(uname -m) (${cpu:-CPU})"
quick=false
for a in "$@"; do [ "$a" = --quick ] && quick=true; done

case "$name" in
index)
    "$build/bench/index_bench" --json "$tmp" "$@" ;;
persistence)
    "$build/bench/persist_bench" --json "$tmp" "$@"
    # Crash rounds: the persistence test's SIGKILL loop, which fails on any
    # lost acknowledged append.
    rounds=200
    $quick && rounds=20
    crash_log=$(mktemp)
    if KVS_CRASH_ROUNDS=$rounds "$build/tests/persist/test_persist" >"$crash_log" 2>&1; then
        lost=0
    else
        lost=unknown
        cat "$crash_log" >&2
    fi
    python3 - "$tmp" "$rounds" "$lost" "$crash_log" <<'PY'
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
    rm -f "$crash_log" ;;
*)
    if [ -x "bench/$name/run.sh" ]; then
        bash "bench/$name/run.sh" "$build" "$tmp" "$@"
    else
        echo "bench/run.sh: unknown benchmark '$name'" >&2; exit 2
    fi ;;
esac

python3 - "$tmp" "$out" "bench/run.sh $name $*" "$machine" "$quick" <<'PY'
import json, sys, datetime
src, dst, command, machine, quick = sys.argv[1:]
r = json.load(open(src))
res = {"bench": r.get("bench"), "command": command.strip(),
       "machine": r.get("machine", machine),
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "quick": quick == "true", "metrics": r["metrics"], "rows": r["rows"]}
json.dump(res, open(dst, "w"), indent=2)
print(json.dumps(res["metrics"]))
PY
echo "bench/run.sh: wrote $out"
