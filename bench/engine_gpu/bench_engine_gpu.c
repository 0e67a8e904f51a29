/*
 * bench_engine_gpu.c: the engine's attend call (kvs_seq_attend, what a
 * decoder calls per layer and step) served by the GPU path vs the CPU
 * path of the same engine, in the same process, at Llama-3-8B geometry per
 * layer (32 query heads, 8 KV heads, head_dim 128, bf16, batch 1).
 *
 * Per context: three stores get the same appends and build their index on
 * the CPU: CPU only, GPU with the layer's K/V in GPU memory (cuda_kv
 * AUTO: it fits), GPU with K/V in pinned host memory behind the GPU cache
 * of 10% of the clusters (cuda_kv HOST, the offload configuration); then
 *   - first GPU attend: the mirror is built (wave buffer allocated, index
 *     and K/V copied in);
 *   - attend only, 50 queries: median call time of GPU wave (both
 *     placements), CPU wave and CPU full attention (fp32, KVS_MODE_FULL: the engine's speed
 *     baseline);
 *   - decode: `steps` x (append one token to both, attend both): median
 *     and p90 of the attend call (the GPU's includes uploading the new
 *     tail row);
 *   - accuracy: GPU wave vs the exact reference (KVS_MODE_EXACT, double)
 *     and GPU wave vs CPU wave, relative L2 per call.
 * Data are synthetic (clustered keys, queries aimed at a cluster centre);
 * real-model traces are in bench_gpu --trace. Times are wall clock of the
 * whole call: query copy in, select, zones, merge, output copy back.
 *
 * Usage: bench_engine_gpu [--quick] [--ctx N[,N...]] [--steps S]
 *                         [--json FILE]
 * Writes the BENCH.md result format (bench "engine_gpu").
 */
#include "kernels/kvs_kernels.h"
#include "kvstore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define D 128
#define QH 32
#define KVH 8
#define NCEN 256

static uint64_t rng = 0x2545f4914f6cdd1dull;
static double urand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}
static float nrand(void) {
    double u = urand(), v = urand();
    return (float)(sqrt(-2 * log(u + 1e-300)) * cos(6.283185307179586 * v));
}

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

static float *centres, *offsets;

static void gen_rows(uint32_t n, uint16_t *k, uint16_t *v) {
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t h = 0; h < KVH; h++) {
            const uint32_t c = (uint32_t)(urand() * NCEN) % NCEN;
            const float *cen = centres + ((size_t)h * NCEN + c) * D;
            uint16_t *kr = k + ((size_t)t * KVH + h) * D;
            uint16_t *vr = v + ((size_t)t * KVH + h) * D;
            for (uint32_t i = 0; i < D; i++) {
                kr[i] = kvs_f32_to_bf16(offsets[h * D + i] + cen[i] +
                                        0.5f * nrand());
                vr[i] = kvs_f32_to_bf16(nrand());
            }
        }
}

static void gen_queries(float *q) {
    const uint32_t group = QH / KVH;
    for (uint32_t i = 0; i < QH; i++) {
        const uint32_t h = i / group;
        const uint32_t c = (uint32_t)(urand() * NCEN) % NCEN;
        const float *cen = centres + ((size_t)h * NCEN + c) * D;
        for (uint32_t k = 0; k < D; k++)
            q[(size_t)i * D + k] = 0.35f * cen[k] + 0.3f * nrand();
    }
}

static double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double pct(double *x, size_t n, double p) {
    qsort(x, n, sizeof *x, cmp_d);
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
            fprintf(stderr, "usage: %s [--quick] [--ctx N,...] [--steps S] "
                            "[--json FILE]\n", argv[0]);
            return 2;
        }
    }
    centres = malloc((size_t)KVH * NCEN * D * sizeof(float));
    offsets = malloc((size_t)KVH * D * sizeof(float));
    for (size_t i = 0; i < (size_t)KVH * NCEN * D; i++)
        centres[i] = 1.5f * nrand();
    for (size_t i = 0; i < (size_t)KVH * D; i++)
        offsets[i] = 2.0f * nrand();

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
    OK(kvs_store_open(&o, &gph));
    const char *info = kvs_store_gpu_info(gpu);
    printf("GPU store: %s; host %ld cores\n", info, cores);
    if (!strncmp(info, "CPU", 3)) {
        fprintf(stderr, "no usable GPU: nothing to measure\n");
        return 77;
    }

    char rows[8][1024];
    double head_gph_ms = 0, head_gpu_ms = 0, head_cpu_ms = 0, head_full_ms = 0, head_err = 0;
    const size_t qn = (size_t)QH * D;
    float *q = malloc(qn * 4), *og = malloc(qn * 4), *oc = malloc(qn * 4),
          *ox = malloc(qn * 4);
    const uint32_t chunk = 8192;
    uint16_t *k = malloc((size_t)chunk * KVH * D * 2),
             *v = malloc((size_t)chunk * KVH * D * 2);
    double *th = malloc(sizeof(double) * (steps + reps + 1)),
           *tg = malloc(sizeof(double) * (steps + reps + 1)),
           *tc = malloc(sizeof(double) * (steps + reps + 1)),
           *tf = malloc(sizeof(double) * (reps + 1)),
           *ex = malloc(sizeof(double) * (steps + reps + 1)),
           *ew = malloc(sizeof(double) * (steps + reps + 1));
    for (uint32_t ci = 0; ci < n_ctx; ci++) {
        const uint32_t ctx = ctxs[ci];
        const uint64_t id = ci + 1;
        kvs_geometry_t geo = {1, QH, KVH, D, KVS_DTYPE_BF16};
        OK(kvs_seq_create(cpu, id, &geo));
        OK(kvs_seq_create(gpu, id, &geo));
        OK(kvs_seq_create(gph, id, &geo));
        double t0 = now_s();
        for (uint32_t done = 0; done < ctx; done += chunk) {
            uint32_t n = ctx - done < chunk ? ctx - done : chunk;
            gen_rows(n, k, v);
            OK(kvs_seq_append(cpu, id, 0, n, k, v));
            OK(kvs_seq_append(gpu, id, 0, n, k, v));
            OK(kvs_seq_append(gph, id, 0, n, k, v));
        }
        OK(kvs_seq_wait_indexed(cpu, id));
        OK(kvs_seq_wait_indexed(gpu, id));
        OK(kvs_seq_wait_indexed(gph, id));
        printf("ctx %u: appended and indexed (three stores) in %.1f s\n", ctx,
               now_s() - t0);
        kvs_query_params_t wave, full, exact;
        kvs_query_params_default(&wave);
        full = wave;
        full.mode = KVS_MODE_FULL;
        exact = wave;
        exact.mode = KVS_MODE_EXACT;

        gen_queries(q);
        const double first = timed_attend(gpu, id, q, &wave, og);
        const double first_h = timed_attend(gph, id, q, &wave, og);
        kvs_store_stats_t st0, st1, sd;
        OK(kvs_store_stats(gph, &st0));

        for (uint32_t r = 0; r < reps; r++) {
            gen_queries(q);
            th[r] = timed_attend(gph, id, q, &wave, og);
            tc[r] = timed_attend(cpu, id, q, &wave, oc);
            tf[r] = timed_attend(cpu, id, q, &full, ox);
            ew[r] = rel_l2(og, oc, qn);
            tg[r] = timed_attend(gpu, id, q, &wave, og);
            const double e2 = rel_l2(og, oc, qn);
            ew[r] = e2 > ew[r] ? e2 : ew[r];
            OK(kvs_seq_attend(cpu, id, 0, q, &exact, ox, NULL));
            ex[r] = rel_l2(og, ox, qn);
        }
        const double g_ms = pct(tg, reps, 0.5) * 1e3;
        const double h_ms = pct(th, reps, 0.5) * 1e3;
        const double c_ms = pct(tc, reps, 0.5) * 1e3;
        const double f_ms = pct(tf, reps, 0.5) * 1e3;
        const double e_med = pct(ex, reps, 0.5), e_p95 = pct(ex, reps, 0.95);
        const double w_max = pct(ew, reps, 1.0);

        /* decode: append one token, attend */
        for (uint32_t s = 0; s < steps; s++) {
            gen_rows(1, k, v);
            OK(kvs_seq_append(cpu, id, 0, 1, k, v));
            OK(kvs_seq_append(gpu, id, 0, 1, k, v));
            OK(kvs_seq_append(gph, id, 0, 1, k, v));
            gen_queries(q);
            tg[s] = timed_attend(gpu, id, q, &wave, og);
            tc[s] = timed_attend(cpu, id, q, &wave, oc);
            ew[s] = rel_l2(og, oc, qn);
            th[s] = timed_attend(gph, id, q, &wave, og);
            const double e2 = rel_l2(og, oc, qn);
            ew[s] = e2 > ew[s] ? e2 : ew[s];
        }
        const double dh = pct(th, steps, 0.5) * 1e3;
        const double dg = pct(tg, steps, 0.5) * 1e3,
                     dg90 = pct(tg, steps, 0.9) * 1e3;
        const double dc = pct(tc, steps, 0.5) * 1e3;
        const double dw_max = pct(ew, steps, 1.0);
        OK(kvs_store_stats(gph, &st1));
        OK(kvs_store_stats(gpu, &sd));
        const double hit =
            st1.gpu_cache_lookups > st0.gpu_cache_lookups
                ? (double)(st1.gpu_cache_hits - st0.gpu_cache_hits) /
                      (st1.gpu_cache_lookups - st0.gpu_cache_lookups)
                : 0;
        printf("ctx %u: first GPU attend (mirror build) %.1f ms (K/V on "
               "GPU) / %.1f ms (K/V pinned); attend median: GPU wave %.3f ms "
               "(K/V pinned + cache: %.3f ms), CPU wave %.3f ms, CPU full "
               "%.3f ms (GPU %.1fx CPU wave, %.1fx CPU full); rel L2 vs exact "
               "median %.4f p95 %.4f, GPU vs CPU wave max %.2g\n",
               ctx, first * 1e3, first_h * 1e3, g_ms, h_ms, c_ms, f_ms,
               c_ms / g_ms, f_ms / g_ms, e_med, e_p95, w_max);
        printf("ctx %u decode %u steps (append + attend): GPU %.3f ms (p90 "
               "%.3f), K/V pinned %.3f ms, CPU wave %.3f ms; GPU vs CPU max "
               "rel L2 %.2g; cache hit rate (pinned) %.3f; GPU %.1f MB (K/V "
               "on GPU) / %.1f MB + %.1f MB pinned\n",
               ctx, steps, dg, dg90, dh, dc, dw_max, hit, sd.gpu_bytes / 1e6,
               st1.gpu_bytes / 1e6, st1.gpu_pinned_bytes / 1e6);
        snprintf(rows[ci], sizeof rows[ci],
                 "{\"context\": %u, \"batch\": 1, \"first_gpu_attend_ms\": "
                 "%.2f, \"first_gpu_pinned_attend_ms\": %.2f, "
                 "\"gpu_wave_ms\": %.4f, \"gpu_pinned_wave_ms\": %.4f, "
                 "\"decode_gpu_pinned_ms\": %.4f, \"cpu_wave_ms\": %.4f, "
                 "\"cpu_full_ms\": %.4f, \"speedup_vs_cpu_wave\": %.2f, "
                 "\"speedup_vs_cpu_full\": %.2f, \"decode_gpu_ms\": %.4f, "
                 "\"decode_gpu_p90_ms\": %.4f, \"decode_cpu_wave_ms\": %.4f, "
                 "\"rel_l2_vs_exact_median\": %.5f, \"rel_l2_vs_exact_p95\": "
                 "%.5f, \"gpu_vs_cpu_wave_max_rel_l2\": %.3g, "
                 "\"cache_hit_rate\": %.4f}",
                 ctx, first * 1e3, first_h * 1e3, g_ms, h_ms, dh, c_ms, f_ms,
                 c_ms / g_ms, f_ms / g_ms, dg, dg90, dc, e_med, e_p95,
                 dw_max > w_max ? dw_max : w_max, hit);
        if (ctx == 131072 || ci + 1 == n_ctx) {
            head_gpu_ms = g_ms;
            head_gph_ms = h_ms;
            head_cpu_ms = c_ms;
            head_full_ms = f_ms;
            head_err = e_med;
        }
        OK(kvs_seq_drop(cpu, id));
        OK(kvs_seq_drop(gpu, id));
        OK(kvs_seq_drop(gph, id));
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
                "\"scripts/gpu-engine-check.sh (bench_engine_gpu%s)\",\n  "
                "\"machine\": \"%ld-core x86-64 host | %s\",\n  \"date\": "
                "\"%s\",\n  \"quick\": %s,\n  \"metrics\": {"
                "\"engine_gpu_attend_ms\": %.4f, "
                "\"engine_gpu_pinned_attend_ms\": %.4f, "
                "\"engine_cpu_wave_attend_ms\": "
                "%.4f, \"engine_cpu_full_attend_ms\": %.4f, "
                "\"engine_gpu_speedup_vs_cpu_wave\": %.2f, "
                "\"engine_gpu_speedup_vs_cpu_full\": %.2f, "
                "\"gpu_rel_l2_median\": %.5f},\n  \"rows\": [\n",
                quick ? " --quick" : "", cores, info + 0, date,
                quick ? "true" : "false", head_gpu_ms, head_gph_ms, head_cpu_ms,
                head_full_ms, head_cpu_ms / head_gpu_ms,
                head_full_ms / head_gpu_ms, head_err);
        for (uint32_t ci = 0; ci < n_ctx; ci++)
            fprintf(f, "    %s%s\n", rows[ci], ci + 1 < n_ctx ? "," : "");
        fprintf(f, "  ]\n}\n");
        fclose(f);
    }
    kvs_store_close(cpu);
    kvs_store_close(gpu);
    kvs_store_close(gph);
    return 0;
}
