#!/usr/bin/env bash
# bench/cluster/run.sh BUILD OUT [--quick]: the `cluster` benchmark (issue
# #16), called by bench/run.sh cluster. cluster_bench starts a real etcd and
# kvstored daemons on loopback and prints one JSON row per measurement; this
# script derives the headline metrics (../shared/BENCH.md) and writes OUT as
# {"bench","metrics","rows"} (bench/run.sh adds command/machine/date).
#
#   failover_ms             median over the kill -9 rounds (3 nodes, R = 2)
#                           of the time from the kill to the first successful
#                           attend started after it; _min/_max beside it
#   restore_r2_ms           median time from the kill until every sequence
#                           is on two live nodes again (2 s lease + repair)
#   lost_acknowledged       acknowledged appended tokens missing from a
#                           holder once repair settled, summed over rounds
#   repair_mb_s             bytes pushed by repair / seconds from a node's
#                           join to every sequence on its top 1, unthrottled;
#                           repair_mb_s_default_throttle at 64M (the default)
#   moved_fraction_on_join  R = 1, 3 nodes + 1: sequences that moved
#                           (rendezvous theory 1/4); _r2 beside it
#   repair_push_mb_s        the same bytes over the time the pushes took
#                           (their repair_pushed log lines), without the
#                           passes that find the work
#   append_gb_s_nN_rR, search_per_s_nN_rR, attend_per_s_nN_rR: aggregate
#                           throughput with N nodes at R, each daemon with
#                           one worker, engine and build thread; _n1_r1_t2:
#                           one daemon with two of each, the baseline (rows:
#                           CPU seconds of every daemon and of the client,
#                           load average)
# MB = 10^6 bytes. Everything shares this machine's cores: the rows say how
# busy they were (cores_busy, loadavg).
set -euo pipefail
build=$1; out=$2; shift 2
bin="$build/bench/cluster/cluster_bench"
[ -x "$bin" ] || { echo "bench/cluster: $bin not built" >&2; exit 1; }
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
"$bin" "$@" >"$rows"

python3 - "$rows" "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
m = {}
fo = [r for r in rows if r["phase"] == "failover" and r["failover_ms"] >= 0]
if fo:
    f = [r["failover_ms"] for r in fo]
    m["failover_ms"] = round(statistics.median(f), 2)
    m["failover_ms_min"] = round(min(f), 2)
    m["failover_ms_max"] = round(max(f), 2)
    m["failover_rounds"] = len(fo)
    g = [r["max_gap_ms"] for r in fo]
    m["failover_max_gap_ms"] = round(statistics.median(g), 2)
    m["failed_reads"] = sum(r["failed_reads"] for r in fo)
    rr = [r["restore_r2_ms"] for r in fo if r["restore_r2_ms"] >= 0]
    if rr:
        m["restore_r2_ms"] = round(statistics.median(rr))
        m["restore_r2_ms_min"] = round(min(rr))
        m["restore_r2_ms_max"] = round(max(rr))
    m["lost_acknowledged"] = sum(r["lost_acknowledged"] for r in fo)
for r in rows:
    if r["phase"] == "repair" and r["bytes"] > 0:
        key = "repair_mb_s" if r["repair_rate_bytes"] == "0" else \
              "repair_mb_s_default_throttle"
        m[key] = round(r["mb_per_s"], 1)
        if r["repair_rate_bytes"] == "0":
            m["repair_push_mb_s"] = round(r["push_mb_per_s"], 1)
    if r["phase"] == "join":
        key = "moved_fraction_on_join" + ("" if r["replicas"] == 1 else
                                          "_r%d" % r["replicas"])
        m[key] = round(r["moved_fraction"], 4)
    if r["phase"] == "throughput" and r["errors"] == 0:
        tag = "n%d_r%d" % (r["nodes"], r["replicas"])
        if r["node_threads"] > 1:
            tag += "_t%d" % r["node_threads"]
        if r["op"] == "append":
            m["append_gb_s_" + tag] = round(r["gb_per_s"], 3)
        else:
            m["%s_per_s_%s" % (r["op"], tag)] = round(r["calls_per_s"], 1)
json.dump({"bench": "cluster", "metrics": m, "rows": rows},
          open(sys.argv[2], "w"), indent=2)
PY
