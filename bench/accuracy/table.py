#!/usr/bin/env python3
"""bench/accuracy/table.py [RESULT_JSON]: the markdown table of an accuracy
result file (default bench/results/accuracy.json), for bench/RESULTS.md."""
import json
import sys

r = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "bench/results/accuracy.json"))
print("| model | context | segment | budget | rel L2 median | rel L2 p95 | keys exact "
      "| clusters retrieved | clusters estimated | greedy agreement | bits full | bits wave |")
print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for x in r["rows"]:
    if x.get("source") == "dump":  # dump_acc: error and keys only
        print("| %s (dump, positions %d-%d) | %d | %d | %s | %.4f | %.4f | %.2f%% | | | | | |" % (
            x["model"], x["context_first"], x["context_last"], x["context_last"],
            x["segment_tokens"], "%s %s, retrieval %g" % (x["variant"], x["rank"], x.get("retrieval_fraction", 0.018)), x["rel_l2_median"],
            x["rel_l2_p95"], 100 * x["exact_fraction"]))
        continue
    bits = x.get("bpb_full", x.get("bits_per_token_full"))
    bw = x.get("bpb_wave", x.get("bits_per_token_wave"))
    unit = "" if "bpb_full" in x else " /tok"
    print("| %s | %d | %d | %s | %.4f | %.4f | %.2f%% | %.2f%% | %.1f%% | %s | %s | %s |" % (
        x["model"], x["context"], x["segment_tokens"], x["variant"],
        x["rel_l2_median"], x["rel_l2_p95"], 100 * x["exact_fraction"],
        100 * x["clusters_retrieved_fraction"], 100 * x["clusters_estimated_fraction"],
        "%.4f (%d)" % (x["greedy_agreement"], x["gen_tokens"]) if "greedy_agreement" in x else "",
        "%.4f%s" % (bits, unit) if bits is not None else "",
        "%.4f%s" % (bw, unit) if bw is not None else ""))
