#!/usr/bin/env python3
"""bench/recall/table.py RESULT_JSON: the markdown tables of a recall run
(bench/results/recall.json) for bench/RESULTS.md: headline, per context,
the out-of-distribution effect and per head. Numbers are copied from the
rows as measured; nothing is recomputed beyond picking and formatting."""
import json
import sys

INDEXES = ("wave", "wave-codes-ratio8", "wave-codes-nospread",
           "wave-centroid", "wave-bounded", "ivf-flat", "hnsw")


def pct(x):
    return "n/r" if x is None else f"{100 * x:.2f}%"


def num(x, f="{:.3f}"):
    return "n/r" if x is None else f.format(x)


def main():
    res = json.load(open(sys.argv[1]))
    rows = res["rows"]
    summ = {(r["context"], r["index"], r["queries"]): r
            for r in rows if r["row"] == "summary"}
    ctxs = sorted({r["context"] for r in rows if r["row"] == "context"})
    info = {r["context"]: r for r in rows if r["row"] == "context"}
    top = ctxs[-1]
    out = []
    if "command" in res:
        out.append(f"Command: `{res['command']}`  \nMachine: {res['machine']}  \n"
                   f"Date: {res['date']}  \nQuick: {res['quick']}\n")
    inp = [r for r in rows if r["row"] == "input"]
    if inp:
        out.append(f"Input: {inp[0]['input']}\n")

    out.append("Fraction of the context's keys whose full vectors are read "
               "(steady zone and unindexed tail included) to reach "
               "recall@100 = R, per (layer, query head, decode query) "
               "pair; median and 90th percentile over pairs; and all bytes "
               "read (centroids, metadata, codes, full keys) over the "
               "context's key bytes at R = 0.95. `n/r`: not reached within "
               "the sweep.\n")
    out.append("| context | index | pairs | R=0.90 median | R=0.95 median | "
               "R=0.95 p90 | R=0.99 median | bytes at R=0.95 median | "
               "bytes at R=0.95 p90 | recall@100 within 2% scan "
               "(median) | pairs at R>=0.95 within 2% |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in ctxs:
        for idx in INDEXES:
            s = summ.get((c, idx, "decode"))
            if not s:
                continue
            out.append(
                f"| {c // 1024}K | {idx} | {s['pairs']} | "
                f"{pct(s['scanned_at_recall90_median'])} | "
                f"**{pct(s['scanned_at_recall95_median'])}** | "
                f"{pct(s['scanned_at_recall95_p90'])} | "
                f"{pct(s['scanned_at_recall99_median'])} | "
                f"{pct(s.get('bytes_read_at_recall95_median'))} | "
                f"{pct(s.get('bytes_read_at_recall95_p90'))} | "
                f"{num(s['recall_at_100_within_2pct_median'], '{:.2f}')} | "
                f"{pct(s['pairs_recall95_within_2pct'])} |")
    out.append("")

    out.append("Context setup (per KV head): keys, wave clusters (= IVF "
               "lists), the steady zone the wave index always scans, and "
               "consistency checks.\n")
    out.append("| context | prefill keys | segments x tokens | clusters/head | "
               "centroids / keys | steady keys | counted HNSW = FAISS | "
               "exact-mode recall@100 | q.k mean cosine (median) | "
               "build s (codes s) | index / raw K+V (codes) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in ctxs:
        i = info[c]
        out.append(
            f"| {c // 1024}K | {i['keys']} | {i['segments']} x "
            f"{i['segment_tokens']} | {num(i['clusters_per_head_mean'], '{:.0f}')}"
            f" | {pct(i['centroid_fraction'])} | "
            f"{num(i['steady_keys_mean'], '{:.0f}')} "
            f"({pct(i['steady_fraction'])}) | "
            f"{num(i['hnsw_counted_search_equals_faiss'], '{:.4f}')} | "
            f"{num(i['exact_mode_recall_at_100'], '{:.4f}')} | "
            f"{num(i['q_k_mean_cosine_median'])} | "
            f"{num(i.get('wave_build_s'), '{:.1f}')} "
            f"({num(i.get('codes_build_s'), '{:.1f}')}) | "
            f"{pct(i.get('index_memory_overhead'))} "
            f"({pct(i.get('codes_memory_overhead'))}) |")
    out.append("")

    out.append(f"Out of distribution ({top // 1024}K): the same indexes "
               "queried with decode queries vs with held-out keys (positions "
               "of the decode queries) as queries.\n")
    out.append("| index | queries | pairs | R=0.95 median | R=0.95 p90 | "
               "R=0.99 median | recall@100 within 2% (median) |")
    out.append("|---|---|---|---|---|---|---|")
    for idx in ("ivf-flat", "wave"):
        for q in ("decode", "key"):
            s = summ.get((top, idx, q))
            if s:
                out.append(
                    f"| {idx} | {q} | {s['pairs']} | "
                    f"{pct(s['scanned_at_recall95_median'])} | "
                    f"{pct(s['scanned_at_recall95_p90'])} | "
                    f"{pct(s['scanned_at_recall99_median'])} | "
                    f"{num(s['recall_at_100_within_2pct_median'], '{:.2f}')} |")
    curves = [r for r in rows if r["row"] == "curve" and r["context"] == top
              and r["index"] == "ivf-flat"]
    by = {}
    for r in curves:
        by.setdefault(r["value"], {})[r["queries"]] = r
    out.append("")
    out.append("| nprobe | scanned (decode) | recall@100 (decode) | "
               "scanned (key) | recall@100 (key) |")
    out.append("|---|---|---|---|---|")
    for v in sorted(by):
        d, k = by[v].get("decode"), by[v].get("key")
        if not d or not k or d["scanned_fraction"] > 0.2:
            continue
        out.append(f"| {v:g} | {pct(d['scanned_fraction'])} | "
                   f"{d['recall_at_100']:.3f} | {pct(k['scanned_fraction'])} | "
                   f"{k['recall_at_100']:.3f} |")
    out.append("")

    heads = {}
    for r in rows:
        if r["row"] == "head" and r["context"] == top and r["queries"] == "decode":
            heads.setdefault((r["layer"], r["q_head"]), {})[r["index"]] = r
    out.append(f"Per head ({top // 1024}K): scanned at recall@100 = 0.95 over "
               "that head's decode queries, median / p90.\n")
    out.append("| layer | q head | kv head | q.k mean cosine | wave | "
               "wave-centroid | wave-bounded | IVF-Flat | HNSW | IVF / wave "
               "(medians) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for (l, h) in sorted(heads):
        e = heads[(l, h)]

        def mp(idx):
            r = e.get(idx)
            if not r:
                return "-"
            return (f"{pct(r['scanned_at_recall95_median'])} / "
                    f"{pct(r['scanned_at_recall95_p90'])}")
        w = e["wave"]["scanned_at_recall95_median"]
        i = e["ivf-flat"]["scanned_at_recall95_median"]
        ratio = f"{i / w:.2f}x" if w and i else "n/r"
        out.append(f"| {l} | {h} | {e['wave']['kv_head']} | "
                   f"{num(e['wave']['q_k_mean_cosine'])} | {mp('wave')} | "
                   f"{mp('wave-centroid')} | {mp('wave-bounded')} | {mp('ivf-flat')} | {mp('hnsw')} | "
                   f"{ratio} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
