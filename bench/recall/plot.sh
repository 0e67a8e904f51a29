#!/usr/bin/env bash
# bench/recall/plot.sh RESULT_JSON OUT_PNG: recall@100 against the fraction
# of keys scanned (both averaged over all (head, query) pairs at each sweep
# point) for the wave index, IVF-Flat and HNSW, decode queries (solid) and
# held-out keys as queries (dashed), one panel per context (the two largest
# in the file). Reads the rows of a recall result (bench/results/recall.json
# or recall_bench's own output); needs python3 and gnuplot.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bench/recall/plot.sh RESULT_JSON OUT_PNG" >&2; exit 2; }
json=$1 png=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ctxs=$(python3 - "$json" "$tmp" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
out = sys.argv[2]
curves = [r for r in rows if r.get("row") == "curve"]
ctxs = sorted({r["context"] for r in curves})[-2:][::-1]
for c in ctxs:
    for idx in ("wave", "wave-centroid", "wave-bounded", "ivf-flat", "hnsw"):
        for q in ("decode", "key"):
            pts = [(r["scanned_fraction"], r["recall_at_100"]) for r in curves
                   if r["context"] == c and r["index"] == idx and r["queries"] == q
                   and r["scanned_fraction"] is not None]
            with open(f"{out}/{c}_{idx}_{q}.tsv", "w") as f:
                for x, y in sorted(pts):
                    f.write(f"{x:.6g}\t{y:.6g}\n")
print(" ".join(str(c) for c in ctxs))
PY
)
set -- $ctxs
n=$#
{
    echo "set terminal pngcairo size $((640 * n)),480 font 'sans,10'"
    echo "set output '$png'"
    echo "set termoption noenhanced"
    echo "set multiplot layout 1,$n"
    for c in "$@"; do
        cat <<EOF
set title 'tinycode128, $((c / 1024))K context: recall@100 vs keys read in full (mean over heads x queries)'
set logscale x
set xrange [0.001:1.05]
set yrange [0:1.01]
set xlabel 'fraction of keys read in full (steady zone and tail included)'
set ylabel 'recall@100'
set key bottom right
set grid
set arrow 1 from 0.02, graph 0 to 0.02, graph 1 nohead dt 3 lc rgb 'gray40'
set arrow 2 from graph 0, first 0.95 to graph 1, first 0.95 nohead dt 3 lc rgb 'gray40'
plot '$tmp/${c}_wave_decode.tsv' u 1:2 w lp pt 7 ps 0.5 lc rgb '#1f77b4' t 'wave, codes (retrieval fraction)', \\
     '$tmp/${c}_wave-centroid_decode.tsv' u 1:2 w lp pt 13 ps 0.5 lc rgb '#9467bd' t 'wave, centroids (before)', \\
     '$tmp/${c}_wave-bounded_decode.tsv' u 1:2 w lp pt 5 ps 0.5 lc rgb '#17becf' t 'wave (bounded, epsilon)', \\
     '$tmp/${c}_ivf-flat_decode.tsv' u 1:2 w lp pt 9 ps 0.5 lc rgb '#d62728' t 'IVF-Flat IP (nprobe)', \\
     '$tmp/${c}_hnsw_decode.tsv' u 1:2 w lp pt 11 ps 0.5 lc rgb '#2ca02c' t 'HNSW32 IP (efSearch)', \\
     '$tmp/${c}_ivf-flat_key.tsv' u 1:2 w l dt 2 lc rgb '#d62728' t 'IVF-Flat, key-to-key queries', \\
     '$tmp/${c}_wave_key.tsv' u 1:2 w l dt 2 lc rgb '#1f77b4' t 'wave, key-to-key queries'
EOF
    done
    echo "unset multiplot"
} > "$tmp/plot.gp"
# An empty series (e.g. a run without HNSW) is a warning, not a failure.
gnuplot "$tmp/plot.gp" 2>&1 | grep -v 'empty\|No data' >&2 || true
echo "bench/recall/plot.sh: wrote $png" >&2
