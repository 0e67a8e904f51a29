/*
 * test_profile.c: tuning profiles (engine/profile.c): what a good profile
 * sets and leaves alone, and that every kind of bad profile is refused
 * whole, with a message naming its line, leaving the options untouched.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "kvstore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int parse(kvs_options_t *o, const char *text, char *err, size_t n) {
    return kvs_options_parse_profile(o, "p", text, strlen(text), err, n);
}

/* Field by field (STYLE.md: never memcmp a struct). */
static void assert_opts_equal(const kvs_options_t *a, const kvs_options_t *b) {
    assert_int_equal(a->segment_tokens, b->segment_tokens);
    assert_int_equal(a->cluster_tokens, b->cluster_tokens);
    assert_int_equal(a->kmeans_iters, b->kmeans_iters);
    assert_int_equal(a->sink_tokens, b->sink_tokens);
    assert_int_equal(a->window_tokens, b->window_tokens);
    assert_int_equal(a->defaults.mode, b->defaults.mode);
    assert_int_equal(a->defaults.budget, b->defaults.budget);
    assert_true(a->defaults.retrieval_fraction ==
                b->defaults.retrieval_fraction);
    assert_true(a->defaults.estimation_fraction ==
                b->defaults.estimation_fraction);
    assert_true(a->defaults.epsilon == b->defaults.epsilon);
    assert_true(a->defaults.scale == b->defaults.scale);
    assert_int_equal(a->n_threads, b->n_threads);
    assert_int_equal(a->deterministic, b->deterministic);
}

static void test_profile_parse_sets_listed_keys(void **state) {
    (void)state;
    kvs_options_t o, before;
    kvs_options_default(&o);
    o.deterministic = 1; /* not a profile key: must survive */
    before = o;
    char err[256];
    const char *text = "# a comment\n"
                       "\n"
                       "kvs_profile 1\r\n"
                       "segment_tokens 4096   # trailing comment\n"
                       "cluster_tokens\t32\n"
                       "budget bounded\n"
                       "epsilon 0.01\n"
                       "estimation_fraction 0.3\n"
                       "mode wave\n"
                       "rank default\n";
    assert_int_equal(parse(&o, text, err, sizeof err), 0);
    assert_string_equal(err, "");
    assert_int_equal(o.segment_tokens, 4096);
    assert_int_equal(o.cluster_tokens, 32);
    assert_int_equal(o.defaults.budget, KVS_BUDGET_BOUNDED);
    assert_int_equal(o.defaults.mode, KVS_MODE_WAVE);
    assert_true(o.defaults.epsilon == 0.01f);
    assert_true(o.defaults.estimation_fraction == 0.3f);
    /* Everything the profile does not list is as it was. */
    assert_int_equal(o.kmeans_iters, before.kmeans_iters);
    assert_int_equal(o.sink_tokens, before.sink_tokens);
    assert_int_equal(o.window_tokens, before.window_tokens);
    assert_true(o.defaults.retrieval_fraction ==
                before.defaults.retrieval_fraction);
    assert_int_equal(o.deterministic, 1);
}

/* Each bad profile: refused with KVS_EINVAL, options untouched, and the
 * message holds `want` (the line number or the reason). */
static void expect_bad(const char *text, const char *want) {
    kvs_options_t o, before;
    kvs_options_default(&o);
    before = o;
    char err[256];
    int rc = parse(&o, text, err, sizeof err);
    if (rc != KVS_EINVAL || !strstr(err, want))
        fail_msg("profile <<%s>>: rc %d, message '%s' (wanted '%s')", text, rc,
                 err, want);
    assert_opts_equal(&o, &before);
}

static void test_profile_parse_refuses_bad_profiles(void **state) {
    (void)state;
    expect_bad("kvs_profile 1\nsegment_tokens 4096\nfoo 1\n",
               "p:3: unknown key 'foo'");
    expect_bad("kvs_profile 2\nsegment_tokens 4096\n",
               "p:1: profile version '2' is not supported");
    expect_bad("kvs_profile x\n", "version 'x' is not supported");
    expect_bad("segment_tokens 4096\nkvs_profile 1\n",
               "p:1: expected 'kvs_profile 1' before any key");
    expect_bad("", "no 'kvs_profile 1' line");
    expect_bad("# only a comment\n\n", "no 'kvs_profile 1' line");
    expect_bad("kvs_profile 1\nkvs_profile 1\n", "p:2: 'kvs_profile' given");
    /* Bad values. */
    expect_bad("kvs_profile 1\ncluster_tokens 1x\n",
               "p:2: cluster_tokens: '1x' is not a whole number");
    expect_bad("kvs_profile 1\ncluster_tokens -4\n", "not a whole number");
    expect_bad("kvs_profile 1\ncluster_tokens 99999999999999999999999\n",
               "not a whole number");
    expect_bad("kvs_profile 1\nretrieval_fraction nan\n",
               "retrieval_fraction: 'nan' is not a number");
    expect_bad("kvs_profile 1\nepsilon inf\n", "is not a number");
    expect_bad("kvs_profile 1\nepsilon 0x1p-3\n", "is not a number");
    expect_bad("kvs_profile 1\nmode fast\n", "p:2: mode: 'fast'");
    expect_bad("kvs_profile 1\nbudget some\n", "p:2: budget: 'some'");
    expect_bad("kvs_profile 1\nrank fastest\n", "p:2: rank: 'fastest'");
    /* Out of range. */
    expect_bad("kvs_profile 1\nretrieval_fraction 1.5\n",
               "p:2: retrieval_fraction: 1.5 is out of range (0, 1]");
    expect_bad("kvs_profile 1\nretrieval_fraction 0\n", "out of range");
    expect_bad("kvs_profile 1\nepsilon -0.1\n", "out of range");
    expect_bad("kvs_profile 1\ncluster_tokens 0\n",
               "cluster_tokens: 0 is out of range [1, 65536]");
    expect_bad("kvs_profile 1\nsegment_tokens 33554432\n", "out of range");
    expect_bad("kvs_profile 1\nkmeans_iters 100000\n", "out of range");
    /* Relations between keys, as the store checks them. */
    expect_bad("kvs_profile 1\nsegment_tokens 64\nwindow_tokens 64\n",
               "segment_tokens (64) must exceed sink_tokens + window_tokens");
    expect_bad("kvs_profile 1\nsegment_tokens 128\ncluster_tokens 256\n",
               "at least cluster_tokens");
    /* Shape of lines. */
    expect_bad("kvs_profile 1\nsegment_tokens\n", "p:2: 'segment_tokens' has "
                                                  "no value");
    expect_bad("kvs_profile 1\nsegment_tokens 1 2\n", "more than one value");
    expect_bad("kvs_profile 1\nsegment_tokens 4096\nsegment_tokens 8192\n",
               "p:3: 'segment_tokens' given twice");
    /* A ranking this build cannot apply is refused, not ignored. */
    expect_bad("kvs_profile 1\nrank codes\n",
               "rank: 'codes' is not supported by this build");
    char *big = malloc(3000);
    assert_non_null(big);
    strcpy(big, "kvs_profile 1\n# ");
    memset(big + strlen(big), 'x', 2000);
    big[2017] = '\0';
    expect_bad(big, "p:2: line longer than");
    free(big);
    /* A NUL byte: not text. */
    kvs_options_t o;
    kvs_options_default(&o);
    char err[128];
    assert_int_equal(kvs_options_parse_profile(&o, "p", "kvs_profile 1\0x", 16,
                                               err, sizeof err),
                     KVS_EINVAL);
    assert_non_null(strstr(err, "NUL"));
}

static void test_profile_load_file(void **state) {
    (void)state;
    char path[] = "/tmp/kvs_profile_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "kvs_profile 1\nsegment_tokens 2048\n"
                       "retrieval_fraction 0.05\n";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    kvs_options_t o;
    kvs_options_default(&o);
    char err[256];
    assert_int_equal(kvs_options_load_profile(&o, path, err, sizeof err), 0);
    assert_int_equal(o.segment_tokens, 2048);
    assert_true(o.defaults.retrieval_fraction == 0.05f);
    /* A store opens with what it loaded. */
    kvs_store_t *st = NULL;
    assert_int_equal(kvs_store_open(&o, &st), 0);
    kvs_store_close(st);
    unlink(path);
    /* A missing file: -errno, and the message names it. */
    assert_int_equal(kvs_options_load_profile(&o, path, err, sizeof err),
                     -2 /* ENOENT */);
    assert_non_null(strstr(err, path));
    /* NULL err is allowed. */
    assert_int_equal(kvs_options_load_profile(&o, path, NULL, 0), -2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_profile_parse_sets_listed_keys),
        cmocka_unit_test(test_profile_parse_refuses_bad_profiles),
        cmocka_unit_test(test_profile_load_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
