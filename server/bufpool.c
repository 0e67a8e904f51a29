/*
 * bufpool.c: the buffers that large request frames are received into
 * (kvs_frame_reader's direct frames), recycled.
 *
 * An append's frame is received into a buffer of its own and its keys and
 * values are handed to the engine from there (decoded in place), so the
 * buffer lives until the request is answered. Fresh memory is the expensive
 * part of that path: the first write to a page faults, and on the VMs we
 * measure on first-touch runs at 0.2-0.5 GB/s against 9-19 GB/s for a copy
 * into warm memory. So freed buffers are kept (a few, bounded in bytes) and
 * handed out again to frames of about their size; the sweep timer returns
 * them to the system once the pool has been idle for a sweep.
 *
 * Loop thread only: buffers are taken by the frame reader and given back
 * in work_done, both on the loop.
 */
#include "server_int.h"

#include <stdlib.h>
#include <string.h>

/* Each buffer is preceded by its capacity, padded so that the payload keeps
 * malloc's alignment (16) and then some. */
#define HDR 64u
/* Sizes are rounded up so that frames of nearby sizes share buffers. */
#define ROUND (64u << 10)

static size_t cap_of(const void *p) {
    size_t cap;
    memcpy(&cap, (const uint8_t *)p - HDR, sizeof(cap));
    return cap;
}

void *kvs__bufpool_alloc(void *ctx, size_t size) {
    kvs__bufpool_t *bp = ctx;
    bp->used = true;
    /* The smallest kept buffer that fits and wastes at most half. */
    int best = -1;
    for (int i = 0; i < bp->n; i++) {
        size_t cap = cap_of(bp->buf[i]);
        if (cap >= size && cap / 2 <= size &&
            (best < 0 || cap < cap_of(bp->buf[best])))
            best = i;
    }
    if (best >= 0) {
        void *p = bp->buf[best];
        bp->bytes -= cap_of(p);
        bp->buf[best] = bp->buf[--bp->n];
        bp->reused++;
        return p;
    }
    size_t cap = (size + ROUND - 1) / ROUND * ROUND;
    if (cap < size) /* overflow */
        return NULL;
    uint8_t *b = malloc(HDR + cap);
    if (!b)
        return NULL;
    memcpy(b, &cap, sizeof(cap));
    bp->fresh++;
    return b + HDR;
}

void kvs__bufpool_free(void *ctx, void *ptr) {
    kvs__bufpool_t *bp = ctx;
    if (!ptr)
        return;
    size_t cap = cap_of(ptr);
    if (bp->n == KVS__BUFPOOL_SLOTS || bp->bytes + cap > bp->max_bytes) {
        /* Keep the larger ones: they cost the most to fault in again. */
        int small = -1;
        for (int i = 0; i < bp->n; i++)
            if (cap_of(bp->buf[i]) < cap &&
                (small < 0 || cap_of(bp->buf[i]) < cap_of(bp->buf[small])))
                small = i;
        if (small < 0 ||
            bp->bytes - cap_of(bp->buf[small]) + cap > bp->max_bytes) {
            free((uint8_t *)ptr - HDR);
            return;
        }
        bp->bytes -= cap_of(bp->buf[small]);
        free((uint8_t *)bp->buf[small] - HDR);
        bp->buf[small] = bp->buf[--bp->n];
    }
    bp->buf[bp->n++] = ptr;
    bp->bytes += cap;
}

void kvs__bufpool_trim(kvs__bufpool_t *bp, bool if_idle) {
    if (if_idle && bp->used) {
        bp->used = false;
        return;
    }
    for (int i = 0; i < bp->n; i++)
        free((uint8_t *)bp->buf[i] - HDR);
    bp->n = 0;
    bp->bytes = 0;
    bp->used = false;
}
