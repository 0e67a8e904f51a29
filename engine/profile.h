/*
 * profile.h: the profile parser behind kvs_options_load_profile (profile.c),
 * on a buffer instead of a file, for the fuzz target and the tests.
 */
#ifndef KVS_ENGINE_PROFILE_H
#define KVS_ENGINE_PROFILE_H

#include "kvstore.h"

#include <stddef.h>

/* Parse `len` bytes of profile text (need not be NUL-terminated) onto
 * `opts`: on success the profile's keys are set and every other field is
 * left as it was; on failure `opts` is untouched and `err` names the line.
 * `name` (may be NULL) prefixes messages. Errors as
 * kvs_options_load_profile. */
int kvs__profile_parse(kvs_options_t *opts, const char *name, const char *text,
                       size_t len, char *err, size_t errlen);

#endif /* KVS_ENGINE_PROFILE_H */
