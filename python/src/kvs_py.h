/*
 * kvs_py.h: what the files of the extension share (private to python/src).
 * arrays.c takes Python arguments as borrowed C arrays: the buffer
 * protocol, DLPack or __array__, checked for dtype, shape and contiguity
 * with errors naming the argument; _kvstore.c is the module and its types.
 * Every function here needs the GIL.
 */
#ifndef KVS_PY_H
#define KVS_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stdint.h>

/* DLPack (dlpack.h, the legacy "dltensor" capsule every framework speaks):
 * the few declarations we consume, so that no header is needed. */
typedef struct {
    int32_t device_type; /* 1 CPU, 2 CUDA, 3 CUDA host (pinned) */
    int32_t device_id;
} kvs_py_dl_device_t;
typedef struct {
    uint8_t code; /* 0 int, 1 uint, 2 float, 4 bfloat */
    uint8_t bits;
    uint16_t lanes;
} kvs_py_dl_dtype_t;
typedef struct {
    void *data;
    kvs_py_dl_device_t device;
    int32_t ndim;
    kvs_py_dl_dtype_t dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL: C-contiguous */
    uint64_t byte_offset;
} kvs_py_dl_tensor_t;
typedef struct kvs_py_dl_managed_s {
    kvs_py_dl_tensor_t dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct kvs_py_dl_managed_s *self);
} kvs_py_dl_managed_t;

#define KVS_PY_MAX_DIMS 8

/* A borrowed view of an input or output array. `owner` is the object whose
 * memory we hold: the argument itself, or its __array__() view. With
 * DLPack, `view` is filled in by us and `dl` is released instead. */
typedef struct {
    Py_buffer view;
    PyObject *owner;
    kvs_py_dl_managed_t *dl;
    Py_ssize_t dl_shape[KVS_PY_MAX_DIMS];
    bool held;
    int cuda_device; /* -1: host memory; else the CUDA device (DLPack) */
} kvs_py_array_t;

/* Release what kvs__py_array_get took (a no-op on a zeroed array). */
void kvs__py_array_release(kvs_py_array_t *a);
/* Element kind of a buffer format: 'f' f32, 'e' f16, 'H' u16 (bf16 bits),
 * 'q' i64; 0 for anything else. */
char kvs__py_format_kind(const char *fmt, Py_ssize_t itemsize);
/* A C-contiguous view of `obj` (named `arg` in errors); writable for
 * outputs. 0, or -1 with a Python exception set. */
int kvs__py_array_get(PyObject *obj, const char *arg, bool writable,
                      kvs_py_array_t *a);
/* kvs__py_array_get that also takes CUDA memory (DLPack device type 2):
 * a->cuda_device says where it lives. The producer is asked to order its
 * pending writes on the device's legacy default stream
 * (__dlpack__(stream=1)), which kvs_seq_attend_device waits for. */
int kvs__py_array_get_any(PyObject *obj, const char *arg, bool writable,
                          kvs_py_array_t *a);
/* Check the element kind and that the shape is rows x cols (see arrays.c);
 * rows 0: any, returned through *rows_out. 0, or -1 with an exception. */
int kvs__py_array_check_shape(kvs_py_array_t *a, const char *arg,
                              char want_kind, const char *want_name,
                              uint64_t rows, uint64_t cols, uint64_t *rows_out);
/* A new numpy array of shape (d0, d1) and dtype ("float32", "int64"). */
PyObject *kvs__py_numpy_empty(Py_ssize_t d0, Py_ssize_t d1, const char *dtype);

#endif /* KVS_PY_H */
