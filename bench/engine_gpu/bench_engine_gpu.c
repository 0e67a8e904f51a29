/*
 * bench_engine_gpu.c: the engine's attend call (kvs_seq_attend, what a
 * decoder calls per layer and step) served by the GPU path vs the CPU
 * path of the same engine, in the same process, at Llama-3-8B geometry per
 * layer (32 query heads, 8 KV heads, head_dim 128, bf16, batch 1).
 *
 * Per context: three stores get the same appends: "cpu" (CPU only),
 * "gpu" (the defaults with cuda_device 0: K/V in GPU memory since they
 * fit, index segments clustered on the GPU), "pinned" (K/V in pinned host
 * memory behind a GPU cache of 10% of the clusters, index built on the
 * CPU, so its answers must equal the CPU store's); then
 *   - index build: append + wait until indexed, per store, keys/s;
 *   - first GPU attend: the mirror is built (wave buffer allocated, index
 *     and K/V copied in);
 *   - attend only, 50 queries: median call time of GPU wave (both
 *     placements), CPU wave and CPU full attention (fp32, KVS_MODE_FULL: the
 * engine's speed baseline);
 *   - decode: `steps` x (append one token to both, attend both): median
 *     and p90 of the attend call (the GPU's includes uploading the new
 *     tail row);
 *   - accuracy: wave vs the exact reference (KVS_MODE_EXACT, double) for
 *     the CPU-built and the GPU-built index, and pinned vs CPU (same
 *     index: must agree to fp32 rounding), relative L2 per call.
 * Data are synthetic (clustered keys, queries aimed at a cluster centre);
 * real-model traces are in bench_gpu --trace. Times are wall clock of the
 * whole call: query copy in, select, zones, merge, output copy back.
 *
 * Usage: bench_engine_gpu [--quick] [--ctx N[,N...]] [--steps S]
 *                         [--json FILE]
 * Writes the BENCH.md result format (bench "engine_gpu").
 */
#include "kvstore.h"
#include "kv_synth.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define D 128
#define QH 32
#define KVH 8
#define NCEN 256 /* key centres per KV head */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define OK(call)                                                               \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_ != 0) {                                                        \
            fprintf(stderr, "%s:%d: %s = %d (%s)\n", __FILE__, __LINE__,       \
                    #call, rc_, kvs_strerror(rc_));                            \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

static kv_synth_t gen;

static double pct(double *x, size_t n, double p) {
    qsort(x, n, sizeof *x, kv_synth_cmp_double);
    return x[(size_t)(p * (n - 1) + 0.5)];
}

static double timed_attend(kvs_store_t *s, uint64_t id, const float *q,
                           const kvs_query_params_t *qp, float *out) {
    double t0 = now_s();
    OK(kvs_seq_attend(s, id, 0, q, qp, out, NULL));
    return now_s() - t0;
}

int main(int argc, char **argv) {
    uint32_t ctxs[8] = {32768, 131072}, n_ctx = 2, steps = 200, reps = 50;
    const char *json = NULL;
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            quick = 1;
            ctxs[0] = 16384;
            n_ctx = 1;
            steps = 30;
            reps = 10;
        } else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) {
            n_ctx = 0;
            for (char *p = strtok(argv[++i], ","); p && n_ctx < 8;
                 p = strtok(NULL, ","))
                ctxs[n_ctx++] = (uint32_t)strtoul(p, NULL, 10);
        } else if (!strcmp(argv[i], "--steps") && i + 1 < argc) {
            steps = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
            json = argv[++i];
        } else {
            fprintf(stderr,
                    "usage: %s [--quick] [--ctx N,...] [--steps S] "
                    "[--json FILE]\n",
                    argv[0]);
            return 2;
        }
    }
    if (kv_synth_init(&gen, KVH, NCEN, 0x2545f4914f6cdd1dull)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }

    kvs_options_t o;
    kvs_options_default(&o);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    o.n_build_threads = cores > 2 ? (uint32_t)(cores / 2) : 1;
    o.blas_threads = 1;
    kvs_store_t *cpu, *gpu, *gph;
    OK(kvs_store_open(&o, &cpu));
    o.cuda_device = 0;
    OK(kvs_store_open(&o, &gpu));
    o.cuda_kv = KVS_CUDA_KV_HOST;
    o.cuda_build = 0;
    OK(kvs_store_open(&o, &gph));
    const char *info = kvs_store_gpu_info(gpu);
    printf("GPU store: %s; host %ld cores, %u builder threads\n", info, cores,
           o.n_build_threads);
    if (!strncmp(info, "CPU", 3)) {
        fprintf(stderr, "no usable GPU: nothing to measure\n");
        return 77;
    }
    kvs_store_t *stores[3] = {cpu, gpu, gph};
    const char *names[3] = {"cpu", "gpu", "pinned"};

    char rows[8][1400];
    double hd[12] = {0};
    const size_t qn = (size_t)QH * D;
    float *q = malloc(qn * 4), *og = malloc(qn * 4), *oc = malloc(qn * 4),
          *oh = malloc(qn * 4), *ox = malloc(qn * 4);
    const size_t T = steps + reps + 1;
    double *th = malloc(sizeof(double) * T), *tg = malloc(sizeof(double) * T),
           *tc = malloc(sizeof(double) * T), *tf = malloc(sizeof(double) * T),
           *ec = malloc(sizeof(double) * T), *eg = malloc(sizeof(double) * T),
           *ew = malloc(sizeof(double) * T);
    for (uint32_t ci = 0; ci < n_ctx; ci++) {
        const uint32_t ctx = ctxs[ci];
        const uint64_t id = ci + 1;
        kvs_geometry_t geo = {1, QH, KVH, D, KVS_DTYPE_BF16};
        const size_t row = (size_t)KVH * D;
        uint16_t *k = malloc((size_t)ctx * row * 2),
                 *v = malloc((size_t)ctx * row * 2);
        kv_synth_rows(&gen, KVS_DTYPE_BF16, ctx, k, v);
        double build_s[3];
        for (int si = 0; si < 3; si++) {
            OK(kvs_seq_create(stores[si], id, &geo));
            const double t0 = now_s();
            for (uint32_t done = 0; done < ctx; done += 8192) {
                uint32_t n = ctx - done < 8192 ? ctx - done : 8192;
                OK(kvs_seq_append(stores[si], id, 0, n, k + done * row,
                                  v + done * row));
            }
            OK(kvs_seq_wait_indexed(stores[si], id));
            build_s[si] = now_s() - t0;
            printf("ctx %u: %s store appended and indexed in %.2f s (%.0f "
                   "keys/s)\n",
                   ctx, names[si], build_s[si],
                   (double)ctx * KVH / build_s[si]);
        }
        free(k);
        free(v);
        kvs_query_params_t wave, full, exact;
        kvs_query_params_default(&wave);
        /* The GPU path ranks by centroid; codes-ranked calls (the
         * default) would run on the CPU. */
        wave.rank = KVS_RANK_CENTROID;
        full = wave;
        full.mode = KVS_MODE_FULL;
        exact = wave;
        exact.mode = KVS_MODE_EXACT;

        kv_synth_queries(&gen, QH, q);
        const double first = timed_attend(gpu, id, q, &wave, og);
        const double first_h = timed_attend(gph, id, q, &wave, oh);
        kvs_store_stats_t st0, st1, sd;
        OK(kvs_store_stats(gph, &st0));
        for (uint32_t r = 0; r < reps; r++) {
            kv_synth_queries(&gen, QH, q);
            th[r] = timed_attend(gph, id, q, &wave, oh);
            tc[r] = timed_attend(cpu, id, q, &wave, oc);
            tf[r] = timed_attend(cpu, id, q, &full, ox);
            tg[r] = timed_attend(gpu, id, q, &wave, og);
            OK(kvs_seq_attend(cpu, id, 0, q, &exact, ox, NULL));
            ec[r] = kv_synth_rel_l2(oc, ox, qn);
            eg[r] = kv_synth_rel_l2(og, ox, qn);
            ew[r] = kv_synth_rel_l2(oh, oc, qn);
        }
        const double g_ms = pct(tg, reps, 0.5) * 1e3;
        const double h_ms = pct(th, reps, 0.5) * 1e3;
        const double c_ms = pct(tc, reps, 0.5) * 1e3;
        const double f_ms = pct(tf, reps, 0.5) * 1e3;
        const double ec_med = pct(ec, reps, 0.5), ec_p95 = pct(ec, reps, 0.95);
        const double eg_med = pct(eg, reps, 0.5), eg_p95 = pct(eg, reps, 0.95);
        double w_max = pct(ew, reps, 1.0);

        /* decode: append one token to every store, attend */
        uint16_t k1[KVH * D], v1[KVH * D];
        for (uint32_t s = 0; s < steps; s++) {
            kv_synth_rows(&gen, KVS_DTYPE_BF16, 1, k1, v1);
            for (int si = 0; si < 3; si++)
                OK(kvs_seq_append(stores[si], id, 0, 1, k1, v1));
            kv_synth_queries(&gen, QH, q);
            tg[s] = timed_attend(gpu, id, q, &wave, og);
            th[s] = timed_attend(gph, id, q, &wave, oh);
            tc[s] = timed_attend(cpu, id, q, &wave, oc);
            ew[s] = kv_synth_rel_l2(oh, oc, qn);
        }
        const double dg = pct(tg, steps, 0.5) * 1e3,
                     dg90 = pct(tg, steps, 0.9) * 1e3;
        const double dh = pct(th, steps, 0.5) * 1e3;
        const double dc = pct(tc, steps, 0.5) * 1e3;
        const double dw = pct(ew, steps, 1.0);
        w_max = dw > w_max ? dw : w_max;
        OK(kvs_store_stats(gph, &st1));
        OK(kvs_store_stats(gpu, &sd));
        const double hit =
            st1.gpu_cache_lookups > st0.gpu_cache_lookups
                ? (double)(st1.gpu_cache_hits - st0.gpu_cache_hits) /
                      (st1.gpu_cache_lookups - st0.gpu_cache_lookups)
                : 0;
        printf("ctx %u: first attend (mirror build) gpu %.1f ms, pinned "
               "%.1f ms; attend median: gpu %.3f ms, pinned %.3f ms, CPU "
               "wave %.3f ms, CPU full %.3f ms (gpu %.1fx CPU wave, %.1fx "
               "CPU full)\n",
               ctx, first * 1e3, first_h * 1e3, g_ms, h_ms, c_ms, f_ms,
               c_ms / g_ms, f_ms / g_ms);
        printf("ctx %u: wave vs exact rel L2 median/p95: CPU-built %.4f/%.4f, "
               "GPU-built %.4f/%.4f; pinned vs CPU (same index) max %.2g\n",
               ctx, ec_med, ec_p95, eg_med, eg_p95, w_max);
        printf("ctx %u decode %u steps (append + attend): gpu %.3f ms (p90 "
               "%.3f), pinned %.3f ms, CPU wave %.3f ms; cache hit rate "
               "(pinned) %.3f; GPU memory %.1f MB (gpu store) / %.1f MB + "
               "%.1f MB pinned; GPU builds %llu\n",
               ctx, steps, dg, dg90, dh, dc, hit, sd.gpu_bytes / 1e6,
               st1.gpu_bytes / 1e6, st1.gpu_pinned_bytes / 1e6,
               (unsigned long long)sd.gpu_builds);
        const double kps_cpu = (double)ctx * KVH / build_s[0];
        const double kps_gpu = (double)ctx * KVH / build_s[1];
        snprintf(rows[ci], sizeof rows[ci],
                 "{\"context\": %u, \"batch\": 1, "
                 "\"index_keys_per_s_cpu\": %.0f, "
                 "\"index_keys_per_s_gpu\": %.0f, "
                 "\"first_gpu_attend_ms\": %.2f, "
                 "\"first_pinned_attend_ms\": %.2f, \"gpu_wave_ms\": %.4f, "
                 "\"pinned_wave_ms\": %.4f, \"cpu_wave_ms\": %.4f, "
                 "\"cpu_full_ms\": %.4f, \"speedup_vs_cpu_wave\": %.2f, "
                 "\"speedup_vs_cpu_full\": %.2f, \"decode_gpu_ms\": %.4f, "
                 "\"decode_gpu_p90_ms\": %.4f, \"decode_pinned_ms\": %.4f, "
                 "\"decode_cpu_wave_ms\": %.4f, "
                 "\"rel_l2_cpu_built_median\": %.5f, "
                 "\"rel_l2_cpu_built_p95\": %.5f, "
                 "\"rel_l2_gpu_built_median\": %.5f, "
                 "\"rel_l2_gpu_built_p95\": %.5f, "
                 "\"pinned_vs_cpu_max_rel_l2\": %.3g, "
                 "\"cache_hit_rate_pinned\": %.4f}",
                 ctx, kps_cpu, kps_gpu, first * 1e3, first_h * 1e3, g_ms, h_ms,
                 c_ms, f_ms, c_ms / g_ms, f_ms / g_ms, dg, dg90, dh, dc, ec_med,
                 ec_p95, eg_med, eg_p95, w_max, hit);
        if (ctx == 131072 || ci + 1 == n_ctx) {
            hd[0] = g_ms, hd[1] = h_ms, hd[2] = c_ms, hd[3] = f_ms;
            hd[4] = eg_med, hd[5] = kps_cpu, hd[6] = kps_gpu, hd[7] = ec_med;
        }
        for (int si = 0; si < 3; si++)
            OK(kvs_seq_drop(stores[si], id));
    }
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            perror(json);
            return 1;
        }
        time_t now = time(NULL);
        char date[32];
        strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
        fprintf(f,
                "{\n  \"bench\": \"engine_gpu\",\n  \"command\": "
                "\"tests/gpu/engine-check.sh --bench (bench_engine_gpu%s)\","
                "\n  \"machine\": \"%ld-core x86-64 host | %s\",\n  "
                "\"date\": \"%s\",\n  \"quick\": %s,\n  \"metrics\": {"
                "\"engine_gpu_attend_ms\": %.4f, "
                "\"engine_gpu_pinned_attend_ms\": %.4f, "
                "\"engine_cpu_wave_attend_ms\": %.4f, "
                "\"engine_cpu_full_attend_ms\": %.4f, "
                "\"engine_gpu_speedup_vs_cpu_wave\": %.2f, "
                "\"engine_gpu_speedup_vs_cpu_full\": %.2f, "
                "\"gpu_rel_l2_median\": %.5f, "
                "\"cpu_rel_l2_median\": %.5f, "
                "\"engine_index_keys_per_s_cpu\": %.0f, "
                "\"engine_index_keys_per_s_gpu\": %.0f},\n  \"rows\": [\n",
                quick ? " --quick" : "", cores, info, date,
                quick ? "true" : "false", hd[0], hd[1], hd[2], hd[3],
                hd[2] / hd[0], hd[3] / hd[0], hd[4], hd[7], hd[5], hd[6]);
        for (uint32_t ci = 0; ci < n_ctx; ci++)
            fprintf(f, "    %s%s\n", rows[ci], ci + 1 < n_ctx ? "," : "");
        fprintf(f, "  ]\n}\n");
        fclose(f);
    }
    for (int si = 0; si < 3; si++)
        kvs_store_close(stores[si]);
    return 0;
}
