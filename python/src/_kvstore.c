/*
 * _kvstore.c: the CPython extension under the `kvstore` package: Store (the
 * in-process engine, include/kvstore.h) and Client (kvstored through
 * libkvsclient, client/kvs_client.h) with one surface.
 *
 * Why C and not pybind11/cffi: a decode step makes one attend call per layer,
 * so the binding's per-call cost matters; here it is argument parsing, a
 * buffer look-up per array and one GIL release.
 *
 * Rules that every method keeps (docs/python.md):
 * - Arrays come in through the buffer protocol (numpy, anything exposing
 *   it) without a copy; objects without it (torch CPU tensors) go through
 *   their __array__() view, also without a copy. They must be C-contiguous
 *   and of the documented dtype and shape, else ValueError/TypeError naming
 *   the argument. Nothing is ever converted silently.
 * - The GIL is released around every engine/client call. A Store is used
 *   from many threads at once (the engine is thread-safe); a Client is not
 *   thread-safe in C, so its calls are serialised by a mutex taken with the
 *   GIL released.
 * - close() waits for calls in flight on other threads (the engine forbids
 *   closing under a running call) and then releases the handle.
 * - Every negative return becomes a kvstore.Error subclass carrying .code,
 *   .name, .strerror (kvs_strerror) and .detail (the handle's message).
 */
#include "kvs_py.h"

#include <structmember.h>

#include <pthread.h>
#include <stdbool.h>
#include <string.h>
#include <unistd.h>

#include "kvs_client.h"
#include "kvstore.h"

#ifndef KVS_PY_VERSION
#define KVS_PY_VERSION "0.0.0"
#endif
#ifndef KVS_PY_HAVE_CUDA
#define KVS_PY_HAVE_CUDA 0
#endif

/* ------------------------------------------------------------- errors */

/* Exception class names by code: the table is kvs_common.h's, so that a
 * code added there without a name here fails the build (see the count
 * check in module init). */
static const struct {
    int code;
    const char *cls;
} kvs__py_err_names[] = {
    {KVS_EINVAL, "InvalidArgumentError"},
    {KVS_ENOSEQ, "NoSequenceError"},
    {KVS_EEXIST, "SequenceExistsError"},
    {KVS_EGEOMETRY, "GeometryError"},
    {KVS_ERANGE, "RangeError"},
    {KVS_ENOTFINITE, "NotFiniteError"},
    {KVS_ENOMEM, "OutOfMemoryError"},
    {KVS_EIO, "StorageIOError"},
    {KVS_ECORRUPT, "CorruptError"},
    {KVS_ELOCKED, "LockedError"},
    {KVS_ECLOSED, "ClosedError"},
    {KVS_EFAISS, "FaissError"},
    {KVS_ETOOBIG, "TooBigError"},
    {KVS_EPROTO, "ProtocolError"},
    {KVS_EAUTH, "AuthError"},
    {KVS_EBUSY, "BusyError"},
    {KVS_ETIMEDOUT, "TimedOutError"},
    {KVS_ECONN, "ConnectionLostError"},
    {KVS_ENOSPC, "NoSpaceError"},
    {KVS_EQUARANTINED, "QuarantinedError"},
    {KVS_ENOTSUP, "NotSupportedError"},
    {KVS_ECONFLICT, "ConflictError"},
};
#define KVS_PY_N_ERR (sizeof(kvs__py_err_names) / sizeof(kvs__py_err_names[0]))

#define KVS__PY_COUNT(name, value, msg) +1
enum { KVS_PY_N_CODES = 0 KVS_ERRNO_MAP(KVS__PY_COUNT) };
#undef KVS__PY_COUNT

static PyObject *kvs_py_error;                 /* kvstore.Error */
static PyObject *kvs_py_err_cls[KVS_PY_N_ERR]; /* its subclasses */

/* Raise the kvstore.Error subclass of `code` with `detail` (may be "").
 * Returns NULL for `return raise_kvs(...)`. */
static PyObject *raise_kvs(int code, const char *detail) {
    PyObject *cls = kvs_py_error;
    for (size_t i = 0; i < KVS_PY_N_ERR; i++) {
        if (kvs__py_err_names[i].code == code) {
            cls = kvs_py_err_cls[i];
            break;
        }
    }
    const char *name = kvs_err_name(code);
    const char *text = kvs_strerror(code);
    PyObject *msg =
        (detail && detail[0])
            ? PyUnicode_FromFormat("%s: %s (%s)", name, text, detail)
            : PyUnicode_FromFormat("%s: %s", name, text);
    if (!msg)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(cls, msg);
    Py_DECREF(msg);
    if (!exc)
        return NULL;
    PyObject *v;
    if ((v = PyLong_FromLong(code))) {
        PyObject_SetAttrString(exc, "code", v);
        Py_DECREF(v);
    }
    if ((v = PyUnicode_FromString(name))) {
        PyObject_SetAttrString(exc, "name", v);
        Py_DECREF(v);
    }
    if ((v = PyUnicode_FromString(text))) {
        PyObject_SetAttrString(exc, "strerror", v);
        Py_DECREF(v);
    }
    if ((v = PyUnicode_DecodeUTF8(detail ? detail : "",
                                  detail ? strlen(detail) : 0, "replace"))) {
        PyObject_SetAttrString(exc, "detail", v);
        Py_DECREF(v);
    }
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return NULL;
}

/* ------------------------------------------------------------- handles */

typedef struct {
    PyObject_HEAD kvs_store_t *store; /* Store; NULL once closed */
    kvs_client_t *client;             /* Client; NULL once closed */
    pthread_mutex_t mu; /* Client only: libkvsclient is not thread-safe */
    int inflight;       /* calls running with the GIL released; under GIL */
    bool closing;       /* close() began: new calls are refused */
    bool is_client;
    int gpu_device; /* Store: the CUDA device its GPU path uses, or -1 */
} kvs_py_handle_t;

static PyTypeObject kvs_py_store_type;
static PyTypeObject kvs_py_client_type;

/* The detail message of a failed call, copied before anything else can run
 * on the handle (the store's is per thread, the client's per handle). */
typedef struct {
    int rc;
    char msg[512];
} kvs_py_result_t;

static void result_take_msg(kvs_py_handle_t *h, kvs_py_result_t *r) {
    const char *m = "";
    if (r->rc == 0)
        return;
    if (h->is_client)
        m = kvs_client_errmsg(h->client);
    else
        m = kvs_store_errmsg(h->store);
    snprintf(r->msg, sizeof(r->msg), "%s", m ? m : "");
}

/* Under the GIL: refuse a closed handle, count the call in flight. */
static int call_begin(kvs_py_handle_t *h) {
    if (h->closing || (!h->store && !h->client)) {
        PyErr_Format(PyExc_ValueError, "kvstore.%s is closed",
                     h->is_client ? "Client" : "Store");
        return -1;
    }
    h->inflight++;
    return 0;
}

static void call_end(kvs_py_handle_t *h) {
    h->inflight--;
}

/* Without the GIL: the Client's mutex around its calls. */
static void lock_client(kvs_py_handle_t *h) {
    if (h->is_client)
        pthread_mutex_lock(&h->mu);
}
static void unlock_client(kvs_py_handle_t *h) {
    if (h->is_client)
        pthread_mutex_unlock(&h->mu);
}

static PyObject *raise_result(const kvs_py_result_t *r) {
    return raise_kvs(r->rc, r->msg);
}

/* ---------------------------------------------------------- converters */

/* An unsigned integer from anything with __index__ (int, numpy and torch
 * integers: engines keep ids in arrays); 0 with an exception set. */
static int index_u64(PyObject *o, unsigned long long *v) {
    PyObject *i = PyNumber_Index(o);
    if (!i)
        return 0;
    *v = PyLong_AsUnsignedLongLong(i);
    Py_DECREF(i);
    return !(*v == (unsigned long long)-1 && PyErr_Occurred());
}

static int conv_u64(PyObject *o, void *p) {
    unsigned long long v;
    if (!index_u64(o, &v))
        return 0;
    *(uint64_t *)p = v;
    return 1;
}

static int conv_u32(PyObject *o, void *p) {
    unsigned long long v;
    if (!index_u64(o, &v))
        return 0;
    if (v > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit 32 bits");
        return 0;
    }
    *(uint32_t *)p = (uint32_t)v;
    return 1;
}

static bool str_ends(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* dtype: "f32"/"float32", "f16"/"float16", "bf16"/"bfloat16", or any object
 * whose .name or str() ends so (numpy dtypes and types, torch dtypes). */
static int conv_dtype(PyObject *o, void *p) {
    PyObject *s = NULL;
    if (PyUnicode_Check(o)) {
        Py_INCREF(o);
        s = o;
    } else if (PyObject_HasAttrString(o, "name") && !PyType_Check(o)) {
        s = PyObject_GetAttrString(o, "name");
    } else {
        s = PyObject_Str(o);
    }
    if (!s)
        return 0;
    const char *c = PyUnicode_Check(s) ? PyUnicode_AsUTF8(s) : NULL;
    int rc = 1;
    if (!c) {
        rc = 0;
    } else if (str_ends(c, "bf16") || str_ends(c, "bfloat16")) {
        *(kvs_dtype_t *)p = KVS_DTYPE_BF16;
    } else if (str_ends(c, "f16") || str_ends(c, "float16") ||
               str_ends(c, "float16'>") || str_ends(c, "half")) {
        *(kvs_dtype_t *)p = KVS_DTYPE_F16;
    } else if (str_ends(c, "f32") || str_ends(c, "float32") ||
               str_ends(c, "float32'>") || str_ends(c, "float")) {
        *(kvs_dtype_t *)p = KVS_DTYPE_F32;
    } else {
        PyErr_Format(PyExc_ValueError,
                     "dtype: expected 'f32', 'f16' or 'bf16', got %R", o);
        rc = 0;
    }
    if (!c && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "dtype: expected a string");
    Py_DECREF(s);
    return rc;
}

/* Query parameters from the keyword arguments shared by search/attend. */
static int params_from(const char *mode, const char *budget, float retrieval,
                       float estimation, float epsilon, float scale,
                       kvs_query_params_t *q) {
    memset(q, 0, sizeof(*q));
    if (!mode || !strcmp(mode, "default"))
        q->mode = KVS_MODE_DEFAULT;
    else if (!strcmp(mode, "wave"))
        q->mode = KVS_MODE_WAVE;
    else if (!strcmp(mode, "exact"))
        q->mode = KVS_MODE_EXACT;
    else if (!strcmp(mode, "full"))
        q->mode = KVS_MODE_FULL;
    else {
        PyErr_Format(PyExc_ValueError,
                     "mode: expected 'wave', 'exact' or 'full', got '%s'",
                     mode);
        return -1;
    }
    if (!budget || !strcmp(budget, "default"))
        q->budget = KVS_BUDGET_DEFAULT;
    else if (!strcmp(budget, "fixed"))
        q->budget = KVS_BUDGET_FIXED;
    else if (!strcmp(budget, "bounded"))
        q->budget = KVS_BUDGET_BOUNDED;
    else {
        PyErr_Format(PyExc_ValueError,
                     "budget: expected 'fixed' or 'bounded', got '%s'", budget);
        return -1;
    }
    q->retrieval_fraction = retrieval;
    q->estimation_fraction = estimation;
    q->epsilon = epsilon;
    q->scale = scale;
    return 0;
}

/* ------------------------------------------------------------ results */

static PyTypeObject kvs_py_attend_stats_type;
static PyStructSequence_Field kvs_py_attend_stats_fields[] = {
    {"keys_total", "tokens in the layer x n_kv_heads"},
    {"keys_exact", "keys attended exactly (steady + retrieval)"},
    {"keys_steady", "of which in the steady zone"},
    {"clusters_total", NULL},
    {"clusters_retrieved", "attended exactly over their members"},
    {"clusters_estimated", "attended as one pseudo-token each"},
    {"clusters_skipped", NULL},
    {"seconds", "wall time of the call"},
    {NULL, NULL},
};
static PyStructSequence_Desc kvs_py_attend_stats_desc = {
    "kvstore.AttendStats", "What one attend call did, summed over KV heads.",
    kvs_py_attend_stats_fields, 8};

static PyTypeObject kvs_py_seq_info_type;
static PyStructSequence_Field kvs_py_seq_info_fields[] = {
    {"layers", NULL},
    {"q_heads", NULL},
    {"kv_heads", NULL},
    {"head_dim", NULL},
    {"dtype", "'f32', 'f16' or 'bf16'"},
    {"tokens_min", "fewest tokens over its layers"},
    {"tokens_max", "most tokens over its layers"},
    {"indexed_tokens", "tokens in built segments, summed over layers"},
    {"segments", NULL},
    {"builds_pending", NULL},
    {"bytes", "RAM held: raw K/V plus index"},
    {"index_bytes", NULL},
    {"resident", "False: evicted to storage"},
    {NULL, NULL},
};
static PyStructSequence_Desc kvs_py_seq_info_desc = {
    "kvstore.SeqInfo", "What a sequence holds (kvs_seq_info_t).",
    kvs_py_seq_info_fields, 13};

static PyObject *attend_stats_new(const kvs_attend_stats_t *s) {
    PyObject *o = PyStructSequence_New(&kvs_py_attend_stats_type);
    if (!o)
        return NULL;
    const uint64_t v[7] = {s->keys_total,         s->keys_exact,
                           s->keys_steady,        s->clusters_total,
                           s->clusters_retrieved, s->clusters_estimated,
                           s->clusters_skipped};
    for (int i = 0; i < 7; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(v[i]);
        if (!x)
            goto err;
        PyStructSequence_SET_ITEM(o, i, x);
    }
    PyObject *x = PyFloat_FromDouble(s->seconds);
    if (!x)
        goto err;
    PyStructSequence_SET_ITEM(o, 7, x);
    return o;
err:
    Py_DECREF(o);
    return NULL;
}

static PyObject *seq_info_new(const kvs_seq_info_t *in) {
    PyObject *o = PyStructSequence_New(&kvs_py_seq_info_type);
    if (!o)
        return NULL;
    const kvs_geometry_t *g = &in->geometry;
    PyObject *x[13] = {
        PyLong_FromUnsignedLong(g->n_layers),
        PyLong_FromUnsignedLong(g->n_q_heads),
        PyLong_FromUnsignedLong(g->n_kv_heads),
        PyLong_FromUnsignedLong(g->head_dim),
        PyUnicode_FromString(kvs_dtype_name(g->dtype)),
        PyLong_FromUnsignedLongLong(in->tokens_min),
        PyLong_FromUnsignedLongLong(in->tokens_max),
        PyLong_FromUnsignedLongLong(in->indexed_tokens),
        PyLong_FromUnsignedLongLong(in->segments),
        PyLong_FromUnsignedLongLong(in->builds_pending),
        PyLong_FromUnsignedLongLong(in->bytes),
        PyLong_FromUnsignedLongLong(in->index_bytes),
        PyBool_FromLong(in->resident),
    };
    int bad = 0;
    for (int i = 0; i < 13; i++) {
        if (!x[i])
            bad = 1;
        PyStructSequence_SET_ITEM(o, i, x[i]);
    }
    if (bad) {
        Py_DECREF(o); /* releases the items set, NULLs included */
        return NULL;
    }
    return o;
}

/* Add key -> unsigned value to dict d; -1 on failure. */
static int dict_u64(PyObject *d, const char *k, uint64_t v) {
    PyObject *x = PyLong_FromUnsignedLongLong(v);
    if (!x)
        return -1;
    int rc = PyDict_SetItemString(d, k, x);
    Py_DECREF(x);
    return rc;
}

static PyObject *store_stats_dict(const kvs_store_stats_t *s) {
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
/* clang-format off */
#define U(f)                                                                   \
    if (dict_u64(d, #f, s->f) < 0)                                             \
        goto err;
    U(sequences) U(bytes) U(index_bytes) U(disk_bytes) U(quarantined)
    U(expired) U(resident_bytes) U(evictions) U(page_ins) U(builds_pending)
    U(builds_done) U(build_keys) U(gpu_attends) U(gpu_fallbacks)
    U(gpu_errors) U(gpu_bytes) U(gpu_pinned_bytes) U(gpu_kv_bytes)
    U(gpu_cache_lookups) U(gpu_cache_hits) U(gpu_bus_bytes)
    U(gpu_upload_bytes) U(gpu_builds) U(gpu_build_errors)
    U(gpu_mirrors_evicted)
/* clang-format on */
#undef U
                                PyObject *x =
                                    PyFloat_FromDouble(s->build_seconds);
    if (!x || PyDict_SetItemString(d, "build_seconds", x) < 0) {
        Py_XDECREF(x);
        goto err;
    }
    Py_DECREF(x);
    x = PyLong_FromLong(s->gpu_device);
    if (!x || PyDict_SetItemString(d, "gpu_device", x) < 0) {
        Py_XDECREF(x);
        goto err;
    }
    Py_DECREF(x);
    return d;
err:
    Py_DECREF(d);
    return NULL;
}

/* ------------------------------------------------------------ lifecycle */

static void handle_release(kvs_py_handle_t *h, kvs_py_result_t *r) {
    r->rc = 0;
    r->msg[0] = 0;
    if (h->store) {
        r->rc = kvs_store_close(h->store);
        h->store = NULL;
    }
    if (h->client) {
        kvs_client_close(h->client);
        h->client = NULL;
    }
}

/* Wait (GIL released, polling) until no call of another thread runs on h,
 * then release it. Calls that begin meanwhile see the handle closed. */
static PyObject *handle_close(kvs_py_handle_t *h, PyObject *unused) {
    (void)unused;
    if (!h->store && !h->client)
        Py_RETURN_NONE;
    if (h->closing) {
        PyErr_SetString(PyExc_RuntimeError, "close() already running");
        return NULL;
    }
    h->closing = true;
    while (h->inflight > 0) {
        Py_BEGIN_ALLOW_THREADS usleep(1000);
        Py_END_ALLOW_THREADS
    }
    kvs_py_result_t r;
    Py_BEGIN_ALLOW_THREADS lock_client(h);
    handle_release(h, &r);
    unlock_client(h);
    Py_END_ALLOW_THREADS h->closing = false;
    if (r.rc)
        return raise_kvs(r.rc, "the store met this write error while open");
    Py_RETURN_NONE;
}

static void handle_dealloc(kvs_py_handle_t *h) {
    kvs_py_result_t r;
    /* No call can be in flight: each holds a reference to h. */
    if (h->store || h->client) {
        Py_BEGIN_ALLOW_THREADS handle_release(h, &r);
        Py_END_ALLOW_THREADS
    }
    pthread_mutex_destroy(&h->mu);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *handle_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    (void)args;
    (void)kw;
    kvs_py_handle_t *h = (kvs_py_handle_t *)type->tp_alloc(type, 0);
    if (!h)
        return NULL;
    pthread_mutex_init(&h->mu, NULL);
    h->is_client = (type == &kvs_py_client_type ||
                    PyType_IsSubtype(type, &kvs_py_client_type));
    return (PyObject *)h;
}

static PyObject *handle_enter(PyObject *self, PyObject *unused) {
    (void)unused;
    Py_INCREF(self);
    return self;
}

static PyObject *handle_exit(PyObject *self, PyObject *args) {
    (void)args;
    PyObject *r = handle_close((kvs_py_handle_t *)self, NULL);
    if (!r)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *handle_closed(kvs_py_handle_t *h, void *unused) {
    (void)unused;
    return PyBool_FromLong(h->closing || (!h->store && !h->client));
}

static int store_init(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"data_dir",
                             "memory_bytes",
                             "sync",
                             "cuda_device",
                             "n_threads",
                             "deterministic",
                             "segment_tokens",
                             "cluster_tokens",
                             "max_sequences",
                             "sink_tokens",
                             "window_tokens",
                             "n_build_threads",
                             NULL};
    const char *data_dir = NULL, *sync = "batch";
    unsigned long long memory_bytes = 0, max_sequences = 0;
    PyObject *cuda = Py_None;
    unsigned int n_threads = 0, seg = 0, clu = 0, sink = 0, win = 0, nb = 0;
    int deterministic = 0;
    if (h->store) {
        PyErr_SetString(PyExc_RuntimeError, "Store already open");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|zKsOIpIIKIII", kwlist,
                                     &data_dir, &memory_bytes, &sync, &cuda,
                                     &n_threads, &deterministic, &seg, &clu,
                                     &max_sequences, &sink, &win, &nb))
        return -1;
    kvs_options_t o;
    kvs_options_default(&o);
    o.data_dir = data_dir;
    o.memory_bytes = memory_bytes;
    if (!strcmp(sync, "batch"))
        o.sync = KVS_SYNC_BATCH;
    else if (!strcmp(sync, "always"))
        o.sync = KVS_SYNC_ALWAYS;
    else if (!strcmp(sync, "none"))
        o.sync = KVS_SYNC_NONE;
    else {
        PyErr_Format(PyExc_ValueError,
                     "sync: expected 'batch', 'always' or 'none', got '%s'",
                     sync);
        return -1;
    }
    if (cuda != Py_None) {
        long dev = PyLong_AsLong(cuda);
        if (dev == -1 && PyErr_Occurred())
            return -1;
        if (dev < -1 || dev > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "cuda_device: out of range");
            return -1;
        }
        o.cuda_device = (int32_t)dev;
    }
    if (n_threads)
        o.n_threads = n_threads;
    if (nb)
        o.n_build_threads = nb;
    if (seg)
        o.segment_tokens = seg;
    if (clu)
        o.cluster_tokens = clu;
    if (sink)
        o.sink_tokens = sink;
    if (win)
        o.window_tokens = win;
    o.max_sequences = max_sequences;
    o.deterministic = deterministic;
    kvs_store_t *s = NULL;
    int rc;
    char msg[512];
    Py_BEGIN_ALLOW_THREADS rc = kvs_store_open(&o, &s);
    if (rc)
        snprintf(msg, sizeof(msg), "%s", kvs_store_open_error());
    Py_END_ALLOW_THREADS if (rc) {
        raise_kvs(rc, msg);
        return -1;
    }
    h->store = s;
    kvs_store_stats_t st;
    h->gpu_device = kvs_store_stats(s, &st) == 0 ? st.gpu_device : -1;
    return 0;
}

static int client_init(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {
        "addrs",    "token", "name", "connect_timeout_ms", "request_timeout_ms",
        "replicas", NULL};
    PyObject *addrs = NULL;
    const char *token = NULL, *name = NULL;
    unsigned int cto = 0, rto = 0, replicas = 0;
    if (h->client) {
        PyErr_SetString(PyExc_RuntimeError, "Client already open");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|zzIII", kwlist, &addrs,
                                     &token, &name, &cto, &rto, &replicas))
        return -1;
    PyObject *seq = NULL;
    const char **list = NULL;
    int ret = -1;
    if (PyUnicode_Check(addrs)) {
        seq = PyTuple_Pack(1, addrs);
    } else {
        seq = PySequence_Tuple(addrs);
    }
    if (!seq)
        goto err;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "addrs: at least one address");
        goto err;
    }
    list = PyMem_Calloc((size_t)n, sizeof(*list));
    if (!list) {
        PyErr_NoMemory();
        goto err;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PyTuple_GET_ITEM(seq, i);
        if (!PyUnicode_Check(a)) {
            PyErr_SetString(PyExc_TypeError, "addrs: expected str addresses");
            goto err;
        }
        if (!(list[i] = PyUnicode_AsUTF8(a)))
            goto err;
    }
    kvs_client_options_t o;
    kvs_client_options_default(&o);
    o.addrs = list;
    o.n_addrs = (size_t)n;
    o.auth_token = token;
    o.client_name = name ? name : "python";
    if (cto)
        o.connect_timeout_ms = cto;
    if (rto)
        o.request_timeout_ms = rto;
    o.replicas = replicas; /* 0: 1; above 8: KVS_EINVAL below */
    kvs_client_t *c = NULL;
    int rc = kvs_client_open(&o, &c); /* parses only: no I/O */
    if (rc) {
        raise_kvs(rc, "invalid client options");
        goto err;
    }
    h->client = c;
    ret = 0;
err:
    PyMem_Free(list);
    Py_XDECREF(seq);
    return ret;
}

/* ------------------------------------------------------------- methods */

/* Run `stmt` (which sets r.rc) with the GIL released, the client locked and
 * the message taken on failure. */
#define KVS_PY_CALL(h, r, stmt)                                                \
    do {                                                                       \
        if (call_begin(h) < 0)                                                 \
            return NULL;                                                       \
        Py_BEGIN_ALLOW_THREADS lock_client(h);                                 \
        stmt;                                                                  \
        result_take_msg(h, &(r));                                              \
        unlock_client(h);                                                      \
        Py_END_ALLOW_THREADS call_end(h);                                      \
    } while (0)

/* KVS_PY_CALL for a caller holding buffers: on a closed handle it jumps to
 * `fail` (which releases them) instead of returning. */
#define KVS_PY_CALL_OR(h, r, stmt, fail)                                       \
    do {                                                                       \
        if (call_begin(h) < 0)                                                 \
            goto fail;                                                         \
        Py_BEGIN_ALLOW_THREADS lock_client(h);                                 \
        stmt;                                                                  \
        result_take_msg(h, &(r));                                              \
        unlock_client(h);                                                      \
        Py_END_ALLOW_THREADS call_end(h);                                      \
    } while (0)

static PyObject *m_create(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"seq",      "layers", "q_heads", "kv_heads",
                             "head_dim", "dtype",  "ttl",     NULL};
    uint64_t seq;
    kvs_geometry_t g;
    memset(&g, 0, sizeof(g));
    g.dtype = KVS_DTYPE_F32;
    uint32_t ttl = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "O&|$O&O&O&O&O&O&", kwlist, conv_u64, &seq, conv_u32,
            &g.n_layers, conv_u32, &g.n_q_heads, conv_u32, &g.n_kv_heads,
            conv_u32, &g.head_dim, conv_dtype, &g.dtype, conv_u32, &ttl))
        return NULL;
    if (!g.n_layers || !g.n_q_heads || !g.n_kv_heads || !g.head_dim) {
        PyErr_SetString(PyExc_TypeError,
                        "create: layers, q_heads, kv_heads and head_dim are "
                        "required keyword arguments (each at least 1)");
        return NULL;
    }
    kvs_py_result_t r = {0};
    KVS_PY_CALL(h, r, {
        if (h->is_client)
            r.rc = kvs_client_seq_create(h->client, seq, &g);
        else
            r.rc = kvs_seq_create(h->store, seq, &g);
        if (r.rc == 0 && ttl) {
            if (h->is_client)
                r.rc = kvs_client_seq_set_ttl(h->client, seq, ttl);
            else
                r.rc = kvs_seq_set_ttl(h->store, seq, ttl);
        }
    });
    if (r.rc)
        return raise_result(&r);
    Py_RETURN_NONE;
}

static const char dtype_kind[] = {'f', 'e', 'H'};
static const char *const dtype_want[] = {
    "float32 (the sequence is f32)", "float16 (the sequence is f16)",
    "bfloat16, or its bits as uint16 or int16 (the sequence is bf16)"};

static PyObject *m_append(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"seq", "layer", "keys", "values", NULL};
    uint64_t seq;
    uint32_t layer;
    PyObject *ko, *vo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&OO", kwlist, conv_u64, &seq,
                                     conv_u32, &layer, &ko, &vo))
        return NULL;
    kvs_py_array_t k, v;
    if (kvs__py_array_get(ko, "keys", false, &k) < 0)
        return NULL;
    if (kvs__py_array_get(vo, "values", false, &v) < 0) {
        kvs__py_array_release(&k);
        return NULL;
    }
    PyObject *ret = NULL;
    kvs_py_result_t r = {0};
    kvs_geometry_t g;
    memset(&g, 0, sizeof(g));
    if (!h->is_client) {
        KVS_PY_CALL(h, r, r.rc = kvs_seq_shape(h->store, seq, layer, &g, NULL));
        if (r.rc) {
            raise_result(&r);
            goto done;
        }
    } else {
        /* The client does not know the geometry; the shapes give it and
         * the server checks it (KVS_EGEOMETRY). */
        char kind = kvs__py_format_kind(k.view.format, k.view.itemsize);
        if (kind != 'f' && kind != 'e' && kind != 'H') {
            PyErr_Format(PyExc_TypeError,
                         "keys: dtype must be float32, float16 or bfloat16 "
                         "(or its bits as uint16 or int16) (buffer format "
                         "'%s')",
                         k.view.format ? k.view.format : "B");
            goto done;
        }
        g.dtype = kind == 'e'   ? KVS_DTYPE_F16
                  : kind == 'H' ? KVS_DTYPE_BF16
                                : KVS_DTYPE_F32;
        if (k.view.ndim != 3) {
            PyErr_SetString(PyExc_ValueError,
                            "keys: shape must be (n_tokens, kv_heads, "
                            "head_dim) for a Client");
            goto done;
        }
        g.n_kv_heads = (uint32_t)k.view.shape[1];
        g.head_dim = (uint32_t)k.view.shape[2];
    }
    uint64_t cols = (uint64_t)g.n_kv_heads * g.head_dim, n_tok = 0, n_v = 0;
    if (g.dtype > KVS_DTYPE_BF16) {
        PyErr_SetString(PyExc_ValueError, "sequence has an unknown dtype");
        goto done;
    }
    if (kvs__py_array_check_shape(&k, "keys", dtype_kind[g.dtype],
                                  dtype_want[g.dtype], 0, cols, &n_tok) < 0 ||
        kvs__py_array_check_shape(&v, "values", dtype_kind[g.dtype],
                                  dtype_want[g.dtype], n_tok, cols, &n_v) < 0)
        goto done;
    if (n_tok > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "keys: too many tokens in one call");
        goto done;
    }
    const void *kp = k.view.buf, *vp = v.view.buf;
    size_t bytes = (size_t)k.view.len;
    KVS_PY_CALL(h, r, {
        if (h->is_client)
            r.rc = kvs_client_seq_append(h->client, seq, layer, (uint32_t)n_tok,
                                         kp, vp, bytes);
        else
            r.rc =
                kvs_seq_append(h->store, seq, layer, (uint32_t)n_tok, kp, vp);
    });
    if (r.rc) {
        raise_result(&r);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    kvs__py_array_release(&k);
    kvs__py_array_release(&v);
    return ret;
}

/* The parsing shared by attend and search. */
typedef struct {
    uint64_t seq;
    uint32_t layer;
    kvs_query_params_t params;
    kvs_py_array_t q;
    uint64_t q_heads, head_dim;
} kvs_py_query_t;

/* Validate queries: [q_heads][head_dim] fp32. For a Store the geometry is
 * looked up (cheap) so that a short array can never be over-read; for a
 * Client the shape gives it and the server checks. */
static int query_prepare(kvs_py_handle_t *h, kvs_py_query_t *q) {
    if (!h->is_client) {
        kvs_py_result_t r = {0};
        kvs_geometry_t g;
        memset(&g, 0, sizeof(g));
        if (call_begin(h) < 0)
            return -1;
        Py_BEGIN_ALLOW_THREADS r.rc =
            kvs_seq_shape(h->store, q->seq, q->layer, &g, NULL);
        result_take_msg(h, &r);
        Py_END_ALLOW_THREADS call_end(h);
        if (r.rc) {
            raise_result(&r);
            return -1;
        }
        q->q_heads = g.n_q_heads;
        q->head_dim = g.head_dim;
        return kvs__py_array_check_shape(&q->q, "queries", 'f', "float32",
                                         q->q_heads, q->head_dim, NULL);
    }
    if (q->q.view.ndim != 2) {
        PyErr_SetString(PyExc_ValueError,
                        "queries: shape must be (q_heads, head_dim)");
        return -1;
    }
    q->q_heads = (uint64_t)q->q.view.shape[0];
    q->head_dim = (uint64_t)q->q.view.shape[1];
    return kvs__py_array_check_shape(&q->q, "queries", 'f', "float32",
                                     q->q_heads, q->head_dim, NULL);
}

static PyObject *m_attend(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"seq",
                             "layer",
                             "queries",
                             "mode",
                             "budget",
                             "retrieval_fraction",
                             "estimation_fraction",
                             "epsilon",
                             "scale",
                             "out",
                             NULL};
    kvs_py_query_t q;
    memset(&q, 0, sizeof(q));
    PyObject *qo, *out = Py_None;
    const char *mode = NULL, *budget = NULL;
    float rf = 0, ef = 0, eps = 0, scale = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "O&O&O|$zzffffO", kwlist, conv_u64, &q.seq, conv_u32,
            &q.layer, &qo, &mode, &budget, &rf, &ef, &eps, &scale, &out))
        return NULL;
    if (params_from(mode, budget, rf, ef, eps, scale, &q.params) < 0)
        return NULL;
    /* CUDA queries: a Store's GPU path (kvs_seq_attend_device) */
    if (kvs__py_array_get_any(qo, "queries", false, &q.q) < 0)
        return NULL;
    PyObject *ret = NULL, *arr = NULL;
    kvs_py_array_t o;
    memset(&o, 0, sizeof(o));
    const int dev = q.q.cuda_device;
    if (dev >= 0 && h->is_client) {
        PyErr_SetString(PyExc_ValueError,
                        "queries: a CUDA tensor; a Client sends host memory "
                        "(move it with .cpu())");
        goto done;
    }
    if (dev >= 0 && h->gpu_device < 0) {
        PyErr_Format(PyExc_ValueError,
                     "queries: on CUDA device %d, but this Store has no GPU "
                     "path (open it with cuda_device=; stats()['gpu_device'] "
                     "is -1)",
                     dev);
        goto done;
    }
    if (dev >= 0 && h->gpu_device != dev) {
        PyErr_Format(PyExc_ValueError,
                     "queries: on CUDA device %d, but this Store's GPU path "
                     "is on device %d",
                     dev, h->gpu_device);
        goto done;
    }
    if (query_prepare(h, &q) < 0)
        goto done;
    if (out == Py_None && dev >= 0) {
        /* a tensor like the queries (torch: same device and dtype) */
        arr =
            PyObject_CallMethod(qo, "new_empty", "((nn))",
                                (Py_ssize_t)q.q_heads, (Py_ssize_t)q.head_dim);
        if (!arr) {
            /* only a missing method is ours to explain; an allocation
             * failure (CUDA out of memory, ...) is passed on as it is */
            if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_TypeError,
                                "out: pass out= for CUDA queries that have no "
                                "new_empty() (torch tensors do)");
            }
            goto done;
        }
    } else if (out == Py_None) {
        arr = kvs__py_numpy_empty((Py_ssize_t)q.q_heads, (Py_ssize_t)q.head_dim,
                                  "float32");
        if (!arr)
            goto done;
    } else {
        Py_INCREF(out);
        arr = out;
    }
    if (kvs__py_array_get_any(arr, "out", true, &o) < 0 ||
        kvs__py_array_check_shape(&o, "out", 'f', "float32", q.q_heads,
                                  q.head_dim, NULL) < 0)
        goto done;
    if (o.cuda_device != dev) {
        PyErr_Format(PyExc_ValueError,
                     "out: must be where queries are (%s%d), not %s%d",
                     dev < 0 ? "host memory, " : "CUDA device ", dev,
                     o.cuda_device < 0 ? "host memory, " : "CUDA device ",
                     o.cuda_device);
        goto done;
    }
    kvs_attend_stats_t st;
    memset(&st, 0, sizeof(st));
    kvs_py_result_t r = {0};
    const float *qp = q.q.view.buf;
    float *op = o.view.buf;
    size_t nq = (size_t)(q.q_heads * q.head_dim);
    KVS_PY_CALL_OR(
        h, r,
        {
            if (h->is_client)
                r.rc = kvs_client_seq_attend(h->client, q.seq, q.layer, qp, nq,
                                             &q.params, op, &st);
            else if (dev >= 0)
                r.rc = kvs_seq_attend_device(h->store, q.seq, q.layer, qp, nq,
                                             &q.params, op, &st);
            else
                r.rc = kvs_seq_attend(h->store, q.seq, q.layer, qp, &q.params,
                                      op, &st);
        },
        done);
    if (r.rc) {
        raise_result(&r);
        goto done;
    }
    PyObject *sto = attend_stats_new(&st);
    if (!sto)
        goto done;
    ret = PyTuple_Pack(2, arr, sto);
    Py_DECREF(sto);
done:
    kvs__py_array_release(&o);
    kvs__py_array_release(&q.q);
    Py_XDECREF(arr);
    return ret;
}

/* observe_queries(seq, layer, queries): queries (n, q_heads, head_dim)
 * float32 (or (n, q_heads * head_dim)). For a Store the geometry gives
 * the row size; for a Client the shape does (3-D only) and the server
 * checks it. */
static PyObject *m_observe_queries(kvs_py_handle_t *h, PyObject *args,
                                   PyObject *kw) {
    static char *kwlist[] = {"seq", "layer", "queries", NULL};
    uint64_t seq;
    uint32_t layer;
    PyObject *qo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&O", kwlist, conv_u64, &seq,
                                     conv_u32, &layer, &qo))
        return NULL;
    kvs_py_array_t a;
    if (kvs__py_array_get(qo, "queries", false, &a) < 0)
        return NULL;
    PyObject *ret = NULL;
    kvs_py_result_t r = {0};
    uint64_t cols = 0, n = 0;
    if (!h->is_client) {
        kvs_geometry_t g;
        memset(&g, 0, sizeof(g));
        KVS_PY_CALL(h, r, r.rc = kvs_seq_shape(h->store, seq, layer, &g, NULL));
        if (r.rc) {
            raise_result(&r);
            goto done;
        }
        cols = (uint64_t)g.n_q_heads * g.head_dim;
    } else {
        if (a.view.ndim != 3) {
            PyErr_SetString(PyExc_ValueError,
                            "queries: shape must be (n, q_heads, head_dim) "
                            "for a Client");
            goto done;
        }
        cols = (uint64_t)a.view.shape[1] * (uint64_t)a.view.shape[2];
    }
    if (kvs__py_array_check_shape(&a, "queries", 'f', "float32", 0, cols, &n) <
        0)
        goto done;
    if (n > UINT32_MAX) {
        /* Past any limit: the engine refuses it with TooBigError. */
        n = (uint64_t)UINT32_MAX;
    }
    const float *qp = a.view.buf;
    size_t nf = (size_t)(n * cols);
    KVS_PY_CALL(h, r, {
        if (h->is_client)
            r.rc = kvs_client_seq_observe_queries(h->client, seq, layer,
                                                  (uint32_t)n, qp, nf);
        else
            r.rc =
                kvs_seq_observe_queries(h->store, seq, layer, (uint32_t)n, qp);
    });
    if (r.rc) {
        raise_result(&r);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    kvs__py_array_release(&a);
    return ret;
}

static PyObject *m_search(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"seq",
                             "layer",
                             "queries",
                             "k",
                             "mode",
                             "budget",
                             "retrieval_fraction",
                             "estimation_fraction",
                             "epsilon",
                             NULL};
    kvs_py_query_t q;
    memset(&q, 0, sizeof(q));
    PyObject *qo;
    uint32_t k;
    const char *mode = NULL, *budget = NULL;
    float rf = 0, ef = 0, eps = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "O&O&OO&|$zzfff", kwlist, conv_u64, &q.seq, conv_u32,
            &q.layer, &qo, conv_u32, &k, &mode, &budget, &rf, &ef, &eps))
        return NULL;
    if (params_from(mode, budget, rf, ef, eps, 0, &q.params) < 0)
        return NULL;
    if (kvs__py_array_get(qo, "queries", false, &q.q) < 0)
        return NULL;
    PyObject *ret = NULL, *pos = NULL, *sc = NULL;
    kvs_py_array_t pa, sa;
    memset(&pa, 0, sizeof(pa));
    memset(&sa, 0, sizeof(sa));
    if (query_prepare(h, &q) < 0)
        goto done;
    if (k == 0) {
        PyErr_SetString(PyExc_ValueError, "k: must be at least 1");
        goto done;
    }
    if (!(pos = kvs__py_numpy_empty((Py_ssize_t)q.q_heads, k, "int64")) ||
        !(sc = kvs__py_numpy_empty((Py_ssize_t)q.q_heads, k, "float32")))
        goto done;
    if (kvs__py_array_get(pos, "positions", true, &pa) < 0 ||
        kvs__py_array_get(sc, "scores", true, &sa) < 0)
        goto done;
    kvs_py_result_t r = {0};
    const float *qp = q.q.view.buf;
    int64_t *pp = pa.view.buf;
    float *sp = sa.view.buf;
    size_t nq = (size_t)(q.q_heads * q.head_dim);
    size_t cap = (size_t)(q.q_heads * k);
    KVS_PY_CALL(h, r, {
        if (h->is_client)
            r.rc = kvs_client_seq_search(h->client, q.seq, q.layer, qp, nq, k,
                                         &q.params, pp, sp, cap);
        else
            r.rc = kvs_seq_search(h->store, q.seq, q.layer, qp, k, &q.params,
                                  pp, sp);
    });
    if (r.rc) {
        raise_result(&r);
        goto done;
    }
    ret = PyTuple_Pack(2, pos, sc);
done:
    kvs__py_array_release(&pa);
    kvs__py_array_release(&sa);
    kvs__py_array_release(&q.q);
    Py_XDECREF(pos);
    Py_XDECREF(sc);
    return ret;
}

static PyObject *m_fork(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"parent", "child", "at_token", NULL};
    uint64_t parent, child;
    PyObject *at = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O&|O", kwlist, conv_u64,
                                     &parent, conv_u64, &child, &at))
        return NULL;
    uint64_t at_token = KVS_CLIENT_FORK_ALL;
    if (at != Py_None && !conv_u64(at, &at_token))
        return NULL;
    kvs_py_result_t r = {0};
    KVS_PY_CALL(h, r, {
        if (h->is_client) {
            r.rc = kvs_client_seq_fork(h->client, parent, at_token, child);
        } else {
            uint64_t at2 = at_token;
            if (at2 == KVS_CLIENT_FORK_ALL) {
                /* Every token the parent's shortest layer holds, as the
                 * client's FORK_ALL means on the server. */
                kvs_seq_info_t in;
                r.rc = kvs_seq_info(h->store, parent, &in);
                at2 = in.tokens_min;
            }
            if (r.rc == 0)
                r.rc = kvs_seq_fork(h->store, parent, at2, child);
        }
    });
    if (r.rc)
        return raise_result(&r);
    Py_RETURN_NONE;
}

static PyObject *m_drop(kvs_py_handle_t *h, PyObject *arg) {
    uint64_t seq;
    if (!conv_u64(arg, &seq))
        return NULL;
    kvs_py_result_t r = {0};
    KVS_PY_CALL(h, r, {
        r.rc = h->is_client ? kvs_client_seq_drop(h->client, seq)
                            : kvs_seq_drop(h->store, seq);
    });
    if (r.rc)
        return raise_result(&r);
    Py_RETURN_NONE;
}

static PyObject *m_set_ttl(kvs_py_handle_t *h, PyObject *args) {
    uint64_t seq;
    uint32_t ttl;
    if (!PyArg_ParseTuple(args, "O&O&:set_ttl", conv_u64, &seq, conv_u32, &ttl))
        return NULL;
    kvs_py_result_t r = {0};
    KVS_PY_CALL(h, r, {
        r.rc = h->is_client ? kvs_client_seq_set_ttl(h->client, seq, ttl)
                            : kvs_seq_set_ttl(h->store, seq, ttl);
    });
    if (r.rc)
        return raise_result(&r);
    Py_RETURN_NONE;
}

static PyObject *m_info(kvs_py_handle_t *h, PyObject *arg) {
    uint64_t seq;
    if (!conv_u64(arg, &seq))
        return NULL;
    kvs_py_result_t r = {0};
    kvs_seq_info_t in;
    memset(&in, 0, sizeof(in));
    KVS_PY_CALL(h, r, {
        r.rc = h->is_client ? kvs_client_seq_info(h->client, seq, &in)
                            : kvs_seq_info(h->store, seq, &in);
    });
    if (r.rc)
        return raise_result(&r);
    return seq_info_new(&in);
}

static PyObject *m_list(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"node", NULL};
    Py_ssize_t node = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n", kwlist, &node))
        return NULL;
    if (node < 0) {
        PyErr_SetString(PyExc_ValueError, "node: must be >= 0");
        return NULL;
    }
    /* The count may grow between asking and fetching: retry with more. */
    size_t cap = 64, n = 0;
    uint64_t *ids = NULL;
    kvs_py_result_t r = {0};
    for (;;) {
        uint64_t *grown = PyMem_Realloc(ids, cap * sizeof(*ids));
        if (!grown) {
            PyMem_Free(ids);
            return PyErr_NoMemory();
        }
        ids = grown;
        uint64_t total = 0;
        KVS_PY_CALL(h, r, {
            if (h->is_client) {
                r.rc = kvs_client_store_list(h->client, (size_t)node, ids, cap,
                                             &n, &total);
            } else {
                r.rc = kvs_store_list(h->store, ids, cap, &n);
                total = n;
                if (n > cap)
                    n = cap;
            }
        });
        if (r.rc) {
            PyMem_Free(ids);
            return raise_result(&r);
        }
        if (total <= cap)
            break;
        cap = (size_t)total + 64;
    }
    PyObject *l = PyList_New((Py_ssize_t)n);
    if (!l)
        goto err;
    for (size_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(ids[i]);
        if (!x)
            goto err;
        PyList_SET_ITEM(l, (Py_ssize_t)i, x);
    }
    PyMem_Free(ids);
    return l;
err:
    Py_XDECREF(l);
    PyMem_Free(ids);
    return NULL;
}

static PyObject *m_stats(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"node", NULL};
    Py_ssize_t node = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n", kwlist, &node))
        return NULL;
    if (node < 0) {
        PyErr_SetString(PyExc_ValueError, "node: must be >= 0");
        return NULL;
    }
    kvs_py_result_t r = {0};
    kvs_client_stats_t cs;
    memset(&cs, 0, sizeof(cs));
    const char *path = NULL;
    KVS_PY_CALL(h, r, {
        if (h->is_client) {
            r.rc = kvs_client_store_stats(h->client, (size_t)node, &cs);
        } else {
            r.rc = kvs_store_stats(h->store, &cs.store);
            path = kvs_store_gpu_info(h->store);
        }
    });
    if (r.rc)
        return raise_result(&r);
    PyObject *d = store_stats_dict(&cs.store);
    if (!d)
        return NULL;
    PyObject *x = PyUnicode_FromString(h->is_client ? cs.attend_path
                                                    : (path ? path : ""));
    if (!x || PyDict_SetItemString(d, "attend_path", x) < 0)
        goto err;
    Py_DECREF(x);
    x = NULL;
    if (h->is_client) {
        if (dict_u64(d, "connections", cs.connections) < 0 ||
            dict_u64(d, "requests_total", cs.requests_total) < 0 ||
            dict_u64(d, "inflight", cs.inflight) < 0 ||
            dict_u64(d, "bytes_in", cs.bytes_in) < 0 ||
            dict_u64(d, "bytes_out", cs.bytes_out) < 0)
            goto err;
        x = PyUnicode_FromString(cs.server_version);
        if (!x || PyDict_SetItemString(d, "server_version", x) < 0)
            goto err;
        Py_DECREF(x);
        x = PyUnicode_FromString(cs.node_id);
        if (!x || PyDict_SetItemString(d, "node_id", x) < 0)
            goto err;
        Py_DECREF(x);
        x = PyFloat_FromDouble(cs.uptime_seconds);
        if (!x || PyDict_SetItemString(d, "uptime_seconds", x) < 0)
            goto err;
        Py_DECREF(x);
    }
    return d;
err:
    Py_XDECREF(x);
    Py_DECREF(d);
    return NULL;
}

/* Store only. */

/* attend_batch(seqs, layer, queries, ..., out=None) -> (out, [stats]):
 * queries (n, q_heads, head_dim) float32, row i for seqs[i]. */
static PyObject *m_attend_batch(kvs_py_handle_t *h, PyObject *args,
                                PyObject *kw) {
    static char *kwlist[] = {"seqs",
                             "layer",
                             "queries",
                             "mode",
                             "budget",
                             "retrieval_fraction",
                             "estimation_fraction",
                             "epsilon",
                             "scale",
                             "out",
                             NULL};
    PyObject *seqo, *qo, *out = Py_None;
    uint32_t layer;
    const char *mode = NULL, *budget = NULL;
    float rf = 0, ef = 0, eps = 0, scale = 0;
    kvs_query_params_t params;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO&O|$zzffffO", kwlist, &seqo,
                                     conv_u32, &layer, &qo, &mode, &budget, &rf,
                                     &ef, &eps, &scale, &out))
        return NULL;
    if (params_from(mode, budget, rf, ef, eps, scale, &params) < 0)
        return NULL;
    PyObject *fast = PySequence_Fast(seqo, "seqs: expected a sequence of ids");
    if (!fast)
        return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *ret = NULL, *arr = NULL, *list = NULL;
    uint64_t *ids = NULL;
    kvs_attend_stats_t *st = NULL;
    kvs_py_array_t q, o;
    memset(&q, 0, sizeof(q));
    memset(&o, 0, sizeof(o));
    if (n == 0 || n > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "seqs: expected 1 or more ids");
        goto done;
    }
    ids = PyMem_Malloc((size_t)n * sizeof(*ids));
    st = PyMem_Calloc((size_t)n, sizeof(*st));
    if (!ids || !st) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!conv_u64(PySequence_Fast_GET_ITEM(fast, i), &ids[i]))
            goto done;
    /* the first sequence's geometry sizes the rows; the engine checks
     * every other sequence against it (GeometryError) */
    kvs_geometry_t g;
    memset(&g, 0, sizeof(g));
    kvs_py_result_t r = {0};
    KVS_PY_CALL_OR(
        h, r, r.rc = kvs_seq_shape(h->store, ids[0], layer, &g, NULL), done);
    if (r.rc) {
        raise_result(&r);
        goto done;
    }
    const uint64_t cols = (uint64_t)g.n_q_heads * g.head_dim;
    if (kvs__py_array_get(qo, "queries", false, &q) < 0 ||
        kvs__py_array_check_shape(&q, "queries", 'f', "float32", (uint64_t)n,
                                  cols, NULL) < 0)
        goto done;
    if (out == Py_None) {
        PyObject *flat = kvs__py_numpy_empty(n * (Py_ssize_t)g.n_q_heads,
                                             (Py_ssize_t)g.head_dim, "float32");
        if (!flat)
            goto done;
        arr = PyObject_CallMethod(flat, "reshape", "((nnn))", n,
                                  (Py_ssize_t)g.n_q_heads,
                                  (Py_ssize_t)g.head_dim);
        Py_DECREF(flat);
        if (!arr)
            goto done;
    } else {
        Py_INCREF(out);
        arr = out;
    }
    if (kvs__py_array_get(arr, "out", true, &o) < 0 ||
        kvs__py_array_check_shape(&o, "out", 'f', "float32", (uint64_t)n, cols,
                                  NULL) < 0)
        goto done;
    const float *qp = q.view.buf;
    float *op = o.view.buf;
    KVS_PY_CALL_OR(h, r,
                   r.rc = kvs_seq_attend_batch(h->store, (uint32_t)n, ids,
                                               layer, qp, (size_t)cols, &params,
                                               op, NULL, st),
                   done);
    if (r.rc) {
        raise_result(&r);
        goto done;
    }
    list = PyList_New(n);
    if (!list)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = attend_stats_new(&st[i]);
        if (!x)
            goto done;
        PyList_SET_ITEM(list, i, x);
    }
    ret = PyTuple_Pack(2, arr, list);
done:
    kvs__py_array_release(&o);
    kvs__py_array_release(&q);
    Py_XDECREF(list);
    Py_XDECREF(arr);
    Py_DECREF(fast);
    PyMem_Free(ids);
    PyMem_Free(st);
    return ret;
}

static PyObject *m_wait_indexed(kvs_py_handle_t *h, PyObject *arg) {
    uint64_t seq;
    if (!conv_u64(arg, &seq))
        return NULL;
    kvs_py_result_t r = {0};
    KVS_PY_CALL(h, r, r.rc = kvs_seq_wait_indexed(h->store, seq));
    if (r.rc)
        return raise_result(&r);
    Py_RETURN_NONE;
}

static PyObject *m_expire(kvs_py_handle_t *h, PyObject *unused) {
    (void)unused;
    kvs_py_result_t r = {0};
    uint64_t n = 0;
    KVS_PY_CALL(h, r, r.rc = kvs_store_expire(h->store, &n));
    if (r.rc)
        return raise_result(&r);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *m_compact(kvs_py_handle_t *h, PyObject *unused) {
    (void)unused;
    kvs_py_result_t r = {0};
    KVS_PY_CALL(h, r, r.rc = kvs_store_compact(h->store));
    if (r.rc)
        return raise_result(&r);
    Py_RETURN_NONE;
}

/* Client only. */
static PyObject *m_ping(kvs_py_handle_t *h, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"node", NULL};
    Py_ssize_t node = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n", kwlist, &node))
        return NULL;
    if (node < 0) {
        PyErr_SetString(PyExc_ValueError, "node: must be >= 0");
        return NULL;
    }
    kvs_py_result_t r = {0};
    KVS_PY_CALL(h, r, r.rc = kvs_client_ping(h->client, (size_t)node));
    if (r.rc)
        return raise_result(&r);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- types */

/* clang-format off */
#define KVS_PY_COMMON_METHODS                                                  \
    {"create", (PyCFunction)(void (*)(void))m_create,                          \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "create(seq, *, layers, q_heads, kv_heads, head_dim, dtype='f32', "       \
     "ttl=0)\nCreate an empty sequence."},                                     \
    {"append", (PyCFunction)(void (*)(void))m_append,                          \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "append(seq, layer, keys, values)\nAppend tokens: keys and values are "   \
     "(n_tokens, kv_heads, head_dim) C-contiguous arrays of the sequence's "   \
     "dtype (bf16 as uint16 bits). Copied before return."},                    \
    {"attend", (PyCFunction)(void (*)(void))m_attend,                          \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "attend(seq, layer, queries, *, mode=None, budget=None, "                 \
     "retrieval_fraction=0, estimation_fraction=0, epsilon=0, scale=0, "       \
     "out=None) -> (out, AttendStats)\nAttention output for float32 "          \
     "queries (q_heads, head_dim); out is float32 (q_heads, head_dim). "       \
     "A Store opened with cuda_device takes CUDA queries (DLPack) and "        \
     "writes a CUDA out (by default queries.new_empty)."},                     \
    {"observe_queries", (PyCFunction)(void (*)(void))m_observe_queries,        \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "observe_queries(seq, layer, queries)\nShow the store decoder queries "  \
     "(float32 (n, q_heads, head_dim), e.g. a sample of the prefill's) so "   \
     "that it sizes each KV head's budget for them. Copied before return."},  \
    {"search", (PyCFunction)(void (*)(void))m_search,                          \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "search(seq, layer, queries, k, *, mode=None, ...) -> (positions, "       \
     "scores)\nTop-k keys per query head: int64 and float32 (q_heads, k)."},   \
    {"fork", (PyCFunction)(void (*)(void))m_fork,                              \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "fork(parent, child, at_token=None)\nCreate child holding the first "     \
     "at_token tokens of parent (None: all of its shortest layer)."},          \
    {"drop", (PyCFunction)(void (*)(void))m_drop, METH_O,                      \
     "drop(seq)\nDrop a sequence."},                                           \
    {"set_ttl", (PyCFunction)(void (*)(void))m_set_ttl, METH_VARARGS,          \
     "set_ttl(seq, seconds)\nExpire seq after seconds without use (0: "        \
     "never)."},                                                               \
    {"info", (PyCFunction)(void (*)(void))m_info, METH_O,                      \
     "info(seq) -> SeqInfo\nWhat a sequence holds."},                          \
    {"list", (PyCFunction)(void (*)(void))m_list,                              \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "list(node=0) -> list[int]\nSequence ids (any order)."},                  \
    {"stats", (PyCFunction)(void (*)(void))m_stats,                            \
     METH_VARARGS | METH_KEYWORDS,                                             \
     "stats(node=0) -> dict\nStore-wide counters."},                           \
    {"close", (PyCFunction)(void (*)(void))handle_close, METH_NOARGS,          \
     "close()\nWait for calls in flight, then release the handle. "            \
     "Idempotent."},                                                           \
    {"__enter__", handle_enter, METH_NOARGS, NULL},                            \
    {"__exit__", handle_exit, METH_VARARGS, NULL}
/* clang-format on */

static PyMethodDef kvs_py_store_methods[] = {
    KVS_PY_COMMON_METHODS,
    {"attend_batch", (PyCFunction)(void (*)(void))m_attend_batch,
     METH_VARARGS | METH_KEYWORDS,
     "attend_batch(seqs, layer, queries, *, mode=None, budget=None, "
     "retrieval_fraction=0, estimation_fraction=0, epsilon=0, scale=0, "
     "out=None) -> (out, list[AttendStats])\nOne decode step of a batch: "
     "queries float32 (n, q_heads, head_dim), row i for seqs[i], attended "
     "in parallel; each row's answer is attend's for it alone. The first "
     "failing sequence's error is raised."},
    {"wait_indexed", (PyCFunction)(void (*)(void))m_wait_indexed, METH_O,
     "wait_indexed(seq)\nBlock until the sequence's queued index builds "
     "finish."},
    {"expire", (PyCFunction)(void (*)(void))m_expire, METH_NOARGS,
     "expire() -> int\nDrop every sequence whose TTL ran out; their count."},
    {"compact", (PyCFunction)(void (*)(void))m_compact, METH_NOARGS,
     "compact()\nCompact the data directory now."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef kvs_py_client_methods[] = {
    KVS_PY_COMMON_METHODS,
    {"ping", (PyCFunction)(void (*)(void))m_ping, METH_VARARGS | METH_KEYWORDS,
     "ping(node=0)\nRound trip to a daemon."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef kvs_py_handle_getset[] = {
    {"closed", (getter)(void (*)(void))handle_closed, NULL,
     "True after close().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject kvs_py_store_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvstore.Store",
    .tp_basicsize = sizeof(kvs_py_handle_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Store(data_dir=None, memory_bytes=0, sync='batch', "
              "cuda_device=None, n_threads=0, deterministic=False, "
              "segment_tokens=0, cluster_tokens=0, max_sequences=0, "
              "sink_tokens=0, window_tokens=0, n_build_threads=0)\n"
              "The in-process store (libkvstore). 0 means the library "
              "default. Thread-safe; calls release the GIL.",
    .tp_new = handle_new,
    .tp_init = (initproc)(void (*)(void))store_init,
    .tp_dealloc = (destructor)(void (*)(void))handle_dealloc,
    .tp_methods = kvs_py_store_methods,
    .tp_getset = kvs_py_handle_getset,
};

static PyTypeObject kvs_py_client_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvstore.Client",
    .tp_basicsize = sizeof(kvs_py_handle_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Client(addrs, token=None, name=None, connect_timeout_ms=0, "
              "request_timeout_ms=0, replicas=1)\nA client of one or many "
              "kvstored daemons: addrs is 'tcp://host:port', 'unix:/path', "
              "a list of them, or 'etcd://host:port/prefix'. replicas: "
              "nodes per sequence (1..8; docs/cluster.md). Calls are "
              "serialised per Client and release the GIL.",
    .tp_new = handle_new,
    .tp_init = (initproc)(void (*)(void))client_init,
    .tp_dealloc = (destructor)(void (*)(void))handle_dealloc,
    .tp_methods = kvs_py_client_methods,
    .tp_getset = kvs_py_handle_getset,
};

/* --------------------------------------------------------------- module */

static PyObject *mod_strerror(PyObject *self, PyObject *arg) {
    (void)self;
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(kvs_strerror((int)code));
}

static PyMethodDef kvs_py_module_methods[] = {
    {"strerror", mod_strerror, METH_O,
     "strerror(code) -> str\nkvs_strerror() of a KVS_E* code or -errno."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kvs_py_module = {
    PyModuleDef_HEAD_INIT,
    "kvstore._kvstore",
    "The C core of the kvstore package (see kvstore/__init__.py).",
    -1,
    kvs_py_module_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__kvstore(void) {
    /* A code added to kvs_common.h needs a class name above. */
    _Static_assert(KVS_PY_N_ERR == KVS_PY_N_CODES,
                   "kvs__py_err_names misses a code of KVS_ERRNO_MAP");
    PyObject *m = PyModule_Create(&kvs_py_module);
    if (!m)
        return NULL;
    if (PyType_Ready(&kvs_py_store_type) < 0 ||
        PyType_Ready(&kvs_py_client_type) < 0)
        goto err;
    if (PyStructSequence_InitType2(&kvs_py_attend_stats_type,
                                   &kvs_py_attend_stats_desc) < 0 ||
        PyStructSequence_InitType2(&kvs_py_seq_info_type,
                                   &kvs_py_seq_info_desc) < 0)
        goto err;
    Py_INCREF(&kvs_py_store_type);
    if (PyModule_AddObject(m, "Store", (PyObject *)&kvs_py_store_type) < 0)
        goto err;
    Py_INCREF(&kvs_py_client_type);
    if (PyModule_AddObject(m, "Client", (PyObject *)&kvs_py_client_type) < 0)
        goto err;
    Py_INCREF(&kvs_py_attend_stats_type);
    if (PyModule_AddObject(m, "AttendStats",
                           (PyObject *)&kvs_py_attend_stats_type) < 0)
        goto err;
    Py_INCREF(&kvs_py_seq_info_type);
    if (PyModule_AddObject(m, "SeqInfo", (PyObject *)&kvs_py_seq_info_type) < 0)
        goto err;

    kvs_py_error = PyErr_NewExceptionWithDoc(
        "kvstore.Error",
        "A kvstore engine or client error: .code (KVS_E* value), .name, "
        ".strerror (kvs_strerror) and .detail (the call's message).",
        NULL, NULL);
    if (!kvs_py_error)
        goto err;
    Py_INCREF(kvs_py_error);
    if (PyModule_AddObject(m, "Error", kvs_py_error) < 0)
        goto err;
    for (size_t i = 0; i < KVS_PY_N_ERR; i++) {
        char qual[96];
        snprintf(qual, sizeof(qual), "kvstore.%s", kvs__py_err_names[i].cls);
        PyObject *cls = PyErr_NewException(qual, kvs_py_error, NULL);
        if (!cls)
            goto err;
        kvs_py_err_cls[i] = cls;
        Py_INCREF(cls);
        if (PyModule_AddObject(m, kvs__py_err_names[i].cls, cls) < 0)
            goto err;
        /* The code each class stands for, for `except` tables. */
        PyObject *code = PyLong_FromLong(kvs__py_err_names[i].code);
        if (!code || PyObject_SetAttrString(cls, "code", code) < 0) {
            Py_XDECREF(code);
            goto err;
        }
        Py_DECREF(code);
    }
#define KVS__PY_CONST(name, value, msg)                                        \
    if (PyModule_AddIntConstant(m, "KVS_" #name, value) < 0)                   \
        goto err;
    KVS_ERRNO_MAP(KVS__PY_CONST)
#undef KVS__PY_CONST
    if (PyModule_AddStringConstant(m, "__version__", KVS_PY_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "HAVE_CUDA", KVS_PY_HAVE_CUDA) < 0)
        goto err;
    return m;
err:
    Py_DECREF(m);
    return NULL;
}
