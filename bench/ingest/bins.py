#!/usr/bin/env python3
"""bench/ingest/bins.py TIMELINE ROW BINS PROGRESS MARKS: turns
ingest_bench's timeline (t acked_gb rate builds_pending indexed_frac, every
~100 ms) and JSON row into bench/ingest/plot.gp's inputs: the acknowledged
rate in MB/s over 1-second bins, the progress in percent (acknowledged,
indexed) and the moments to mark (labels of moments closer than 3 s are
joined)."""
import json
import sys

timeline, row, bins, progress, marks = sys.argv[1:6]
pts = []
for line in open(timeline):
    f = line.split()
    if len(f) >= 5:
        pts.append((float(f[0]), float(f[1]), float(f[4])))
r = json.loads(open(row).read())
total_gb = r["bytes"] / 1e9


def acked_at(x):
    v = 0.0
    for t, g, _ in pts:
        if t > x:
            break
        v = g
    return v


with open(bins, "w") as out:
    end = pts[-1][0] if pts else 0
    t = 0.0
    while t < end:
        out.write("%.1f %.2f\n" % (t + 0.5, (acked_at(t + 1) - acked_at(t)) * 1e3))
        t += 1.0
with open(progress, "w") as out:
    for t, g, ix in pts:
        out.write("%.3f %.3f %s\n" % (t, 100 * g / total_gb,
                                      "%.3f" % (100 * ix) if ix > 0 else "NaN"))
moments = []
for key, name in (("acked_s", "all acknowledged"),
                  ("first_search_s", "searchable"),
                  ("flushed_s", "durable (flush)"),
                  ("indexed_s", "all indexed")):
    if r.get(key, -1) >= 0:
        text = "%s %.1f s" % (name, r[key])
        if moments and r[key] - moments[-1][0] < 3:
            moments[-1][1] += ", " + text
        else:
            moments.append([r[key], text])
with open(marks, "w") as out:
    for t, text in moments:
        out.write('%.2f "%s"\n' % (t, text))
