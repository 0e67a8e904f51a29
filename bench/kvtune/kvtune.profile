# kvtune profile (docs/kvtune.md), 2026-12-07T01:32:34Z
# sample: /tmp/idxrecall/qkv_32k.bin
# target: mean recall@100 >= 0.95
# measured here: recall 0.9535, full keys read 1.522% median (3.815% p90), bytes read 3.864% of key bytes, rel. L2 0.05548 median (0.22020 p90), attended exactly 1.524%, attend 154.7 us
kvs_profile 1
segment_tokens 1024
cluster_tokens 32
kmeans_iters 10
sink_tokens 4
window_tokens 64
mode wave
budget fixed
retrieval_fraction 0.005
estimation_fraction 0.232
rank default
# per layer / KV head (kvs_options_t takes one budget for all: reported, not applied):
# layer 0: retrieval_fraction 0.002 ef 0.232 (recall 0.9838, keys 1.225%, bytes 2.928%, relL2 0.05124)
# layer 0 kv 0: retrieval_fraction 0.002 ef 0.232 (recall 0.9688, keys 1.225%, bytes 2.901%, relL2 0.02230)
# layer 0 kv 1: retrieval_fraction 0.002 ef 0.232 (recall 0.9988, keys 1.225%, bytes 2.928%, relL2 0.05967)
# layer 1: retrieval_fraction 0.002 ef 0.232 (recall 0.9778, keys 1.225%, bytes 2.927%, relL2 0.02427)
# layer 1 kv 0: retrieval_fraction 0.002 ef 0.232 (recall 0.9669, keys 1.225%, bytes 2.895%, relL2 0.04194)
# layer 1 kv 1: retrieval_fraction 0.002 ef 0.232 (recall 0.9887, keys 1.225%, bytes 2.927%, relL2 0.01961)
# layer 2: retrieval_fraction 0.002 ef 0.232 (recall 0.9769, keys 1.225%, bytes 2.926%, relL2 0.07182)
# layer 2 kv 0: retrieval_fraction 0.002 ef 0.232 (recall 0.9688, keys 1.225%, bytes 2.926%, relL2 0.08241)
# layer 2 kv 1: retrieval_fraction 0.002 ef 0.232 (recall 0.9850, keys 1.225%, bytes 2.924%, relL2 0.04117)
# layer 3: retrieval_fraction 0.005 ef 0.232 (recall 0.9700, keys 1.522%, bytes 3.847%, relL2 0.06845)
# layer 3 kv 0: retrieval_fraction 0.018 ef 0.232 (recall 0.9950, keys 2.813%, bytes 7.873%, relL2 0.06528)
# layer 3 kv 1: retrieval_fraction 0.002 ef 0.232 (recall 0.9938, keys 1.225%, bytes 2.904%, relL2 0.06287)
# layer 4: retrieval_fraction 0.018 ef 0.232 (recall 0.9728, keys 2.813%, bytes 7.889%, relL2 0.07035)
# layer 4 kv 0: retrieval_fraction 0.018 ef 0.232 (recall 0.9825, keys 2.813%, bytes 7.871%, relL2 0.06704)
# layer 4 kv 1: retrieval_fraction 0.018 ef 0.232 (recall 0.9631, keys 2.813%, bytes 7.889%, relL2 0.07035)
# layer 5: retrieval_fraction 0.018 ef 0.232 (recall 0.9944, keys 2.813%, bytes 7.896%, relL2 0.07565)
# layer 5 kv 0: retrieval_fraction 0.018 ef 0.232 (recall 0.9925, keys 2.813%, bytes 7.873%, relL2 0.03397)
# layer 5 kv 1: retrieval_fraction 0.005 ef 0.232 (recall 0.9556, keys 1.522%, bytes 3.851%, relL2 0.17347)
