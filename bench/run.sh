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

# Every benchmark lives in bench/NAME/ with its sources and a run.sh that
# takes BUILD OUT [args] and writes OUT as {"bench","metrics","rows"}.
[ -x "bench/$name/run.sh" ] || { echo "bench/run.sh: unknown benchmark '$name'" >&2; exit 2; }
bash "bench/$name/run.sh" "$build" "$tmp" "$@"

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
