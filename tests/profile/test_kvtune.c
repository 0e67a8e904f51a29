/*
 * test_kvtune.c: kvtune end to end on a small real sample, and its profile
 * taken up by everything that loads profiles. kvdecode dumps tinycode128's
 * queries and keys over 1,100 bytes of this repository's README (a few
 * seconds), kvtune sweeps it (2 layers, 8 decode queries, two segment and
 * one cluster size, --quick), and the test checks the Pareto table, the
 * profile and the JSON result, then loads the profile with
 * kvs_options_load_profile, opens a store with it and attends, runs
 * kvdecode --profile, and starts kvstored --profile (a bad profile must
 * stop it with a message). Bounded to well under a minute on 2 cores.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "daemon.h"
#include "kvstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MODEL KVS_SHARED_DATA "/tinycode128.bin"
#define KVTUNE KVS_BINARY_DIR "/tools/kvtune/kvtune"
#define KVDECODE KVS_BINARY_DIR "/tools/kvdecode/kvdecode"

static char dir[64];

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b) {
        size_t got = fread(b, 1, (size_t)n, f);
        b[got] = '\0';
    }
    fclose(f);
    return b;
}

static int setup(void **state) {
    (void)state;
    if (access(MODEL, R_OK)) {
        fprintf(stderr, "test_kvtune: %s missing\n", MODEL);
        return -1;
    }
    snprintf(dir, sizeof dir, "/tmp/kvs-kvtune-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "head -c 1100 %s/README.md > %s/text.txt && %s %s --text "
             "%s/text.txt --ctx 1100 --dump %s/qkv.bin --quiet --threads 2 "
             "> %s/kvdecode.log 2>&1",
             KVS_SOURCE_DIR, dir, KVDECODE, MODEL, dir, dir, dir);
    return system(cmd) == 0 ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_kvtune_end_to_end(void **state) {
    (void)state;
    char cmd[2048], path[256];
    snprintf(cmd, sizeof cmd,
             "%s --dump %s/qkv.bin --profile %s/tuned.profile --json "
             "%s/kvtune.json --quick --layers 2 --queries 8 --segments "
             "256,512 --clusters 16 > %s/out.txt 2> %s/err.txt",
             KVTUNE, dir, dir, dir, dir, dir);
    int rc = system(cmd);
    snprintf(path, sizeof path, "%s/err.txt", dir);
    char *errtxt = slurp(path);
    if (rc)
        fprintf(stderr, "%s\n", errtxt ? errtxt : "");
    assert_int_equal(rc, 0);
    /* Plain progress lines when stderr is not a terminal. */
    assert_non_null(
        strstr(errtxt, "kvtune: 8/8 layer 2/2 kv 2/2 seg 512 cl 16"));
    free(errtxt);

    /* The table: a front with the profile's point marked. */
    snprintf(path, sizeof path, "%s/out.txt", dir);
    char *out = slurp(path);
    assert_non_null(out);
    assert_non_null(strstr(out, "Pareto front"));
    assert_non_null(strstr(out, "recall"));
    assert_non_null(strstr(out, "\n* "));
    assert_non_null(strstr(out, "per layer and KV head"));
    unsigned n_front = 0;
    const char *p = strstr(out, "points, ");
    assert_non_null(p);
    assert_int_equal(sscanf(p, "points, %u on the Pareto front", &n_front), 1);
    assert_true(n_front >= 1);
    free(out);

    /* The JSON result carries the BENCH.md metrics. */
    snprintf(path, sizeof path, "%s/kvtune.json", dir);
    char *js = slurp(path);
    assert_non_null(js);
    char want[64];
    snprintf(want, sizeof want, "\"pareto_points\":%u", n_front);
    assert_non_null(strstr(js, want));
    assert_non_null(strstr(js, "\"rel_l2_median\":"));
    assert_non_null(strstr(js, "\"exact_fraction\":"));
    assert_non_null(strstr(js, "\"tune_s\":"));
    assert_non_null(strstr(js, "\"profile\":true"));
    free(js);

    /* The profile: versioned, the chosen build, loadable. */
    snprintf(path, sizeof path, "%s/tuned.profile", dir);
    char *prof = slurp(path);
    assert_non_null(prof);
    assert_non_null(strstr(prof, "\nkvs_profile 1\n"));
    assert_non_null(strstr(prof, "\ncluster_tokens 16\n"));
    assert_true(strstr(prof, "\nsegment_tokens 256\n") ||
                strstr(prof, "\nsegment_tokens 512\n"));
    free(prof);
    kvs_options_t o;
    kvs_options_default(&o);
    char err[256];
    assert_int_equal(kvs_options_load_profile(&o, path, err, sizeof err), 0);
    assert_true(o.segment_tokens == 256 || o.segment_tokens == 512);
    assert_int_equal(o.cluster_tokens, 16);
    assert_int_equal(o.defaults.mode, KVS_MODE_WAVE);
    assert_true(o.defaults.retrieval_fraction > 0 ||
                o.defaults.budget == KVS_BUDGET_BOUNDED);

    /* A store opens with it, builds a segment of the profile's size and
     * attends. */
    kvs_store_t *st = NULL;
    o.deterministic = 1;
    assert_int_equal(kvs_store_open(&o, &st), 0);
    kvs_geometry_t geo = {1, 2, 1, 32, KVS_DTYPE_F32};
    assert_int_equal(kvs_seq_create(st, 1, &geo), 0);
    uint32_t n = 700;
    float *kv = malloc((size_t)n * 32 * sizeof(float));
    assert_non_null(kv);
    for (size_t i = 0; i < (size_t)n * 32; i++)
        kv[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
    assert_int_equal(kvs_seq_append(st, 1, 0, n, kv, kv), 0);
    float q[64], outv[64];
    for (int i = 0; i < 64; i++)
        q[i] = (float)(i % 7) * 0.1f;
    kvs_attend_stats_t as = {0};
    assert_int_equal(kvs_seq_attend(st, 1, 0, q, NULL, outv, &as), 0);
    assert_int_equal(as.keys_total, n);
    /* An index segment was used: not every key was attended exactly. */
    assert_true(as.clusters_total > 0);
    free(kv);
    assert_int_equal(kvs_store_close(st), 0);

    /* kvdecode --profile decodes through the store with it. */
    snprintf(cmd, sizeof cmd,
             "%s %s --text %s/text.txt --ctx 600 --attn store-wave "
             "--profile %s --quiet --threads 2 > %s/dec.txt 2>&1",
             KVDECODE, MODEL, dir, path, dir);
    assert_int_equal(system(cmd), 0);

    /* kvstored --profile serves with it and says so. */
    test_daemon_t d = {0};
    const char *extra[] = {"--profile", path, NULL};
    assert_int_equal(td_start(&d, extra), 0);
    assert_int_equal(td_stop(&d), 0);
    char *log = slurp(d.log);
    assert_non_null(log);
    assert_non_null(strstr(log, "profile_loaded"));
    free(log);
    td_cleanup(&d);
}

static void test_kvtune_bad_profile_refused(void **state) {
    (void)state;
    char path[256], cmd[1024];
    snprintf(path, sizeof path, "%s/bad.profile", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("kvs_profile 1\nsegment_tokens 4096\nturbo yes\n", f);
    fclose(f);
    /* kvstored stops before listening, naming the line. */
    test_daemon_t d = {0};
    const char *extra[] = {"--profile", path, NULL};
    fprintf(stderr, "test_kvtune: a daemon refusing a bad profile "
                    "(its log follows)\n");
    assert_true(td_start(&d, extra) != 0);
    char *log = slurp(d.log);
    assert_non_null(log);
    assert_non_null(strstr(log, "profile_failed"));
    assert_non_null(strstr(log, "bad.profile:3: unknown key 'turbo'"));
    free(log);
    td_cleanup(&d);
    /* kvdecode refuses it as a usage error. */
    snprintf(cmd, sizeof cmd,
             "%s %s --ctx 8 --profile %s --quiet > %s/dec_bad.txt 2>&1",
             KVDECODE, MODEL, path, dir);
    int rc = system(cmd);
    assert_true(WIFEXITED(rc) && WEXITSTATUS(rc) == 2);
    /* kvtune refuses a file that is not a dump. */
    snprintf(cmd, sizeof cmd, "%s --dump %s --profile %s/x > /dev/null 2>&1",
             KVTUNE, path, dir);
    rc = system(cmd);
    assert_true(WIFEXITED(rc) && WEXITSTATUS(rc) == 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kvtune_end_to_end),
        cmocka_unit_test(test_kvtune_bad_profile_refused),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
