/*
 * arrays.c: Python arguments as borrowed C arrays, without copies. The
 * buffer protocol first (numpy, memoryview), then DLPack (__dlpack__:
 * torch tensors), then __array__ (a numpy view of the object). Nothing is
 * converted: a wrong dtype, shape, stride or device is refused with an
 * error that names the argument, so a caller never pays a hidden copy.
 */
#include "kvs_py.h"

#include <string.h>

void kvs__py_array_release(kvs_py_array_t *a) {
    if (a->dl) {
        if (a->dl->deleter)
            a->dl->deleter(a->dl);
        a->dl = NULL;
    } else if (a->held) {
        PyBuffer_Release(&a->view);
    }
    Py_XDECREF(a->owner);
    a->held = false;
    a->owner = NULL;
}

/* Take obj.__dlpack__() into `a`: C-contiguous, a dtype we know, CPU
 * memory (CUDA memory too with cuda_ok: then a->cuda_device is set). */
static int array_get_dlpack(PyObject *obj, const char *arg, bool cuda_ok,
                            kvs_py_array_t *a) {
    int type = 1;
    PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (dev) {
        int id = 0;
        int ok = PyArg_ParseTuple(dev, "ii", &type, &id);
        Py_DECREF(dev);
        if (!ok)
            return -1;
        if (type != 1 && type != 3 && !(type == 2 && cuda_ok)) {
            PyErr_Format(PyExc_ValueError,
                         "%s: device must be the CPU (DLPack device type %d, "
                         "id %d); move it with .cpu()%s",
                         arg, type, id,
                         type == 2 ? " (CUDA tensors: queries and out of a "
                                     "Store opened with cuda_device)"
                                   : "");
            return -1;
        }
    } else {
        PyErr_Clear();
    }
    PyObject *cap;
    if (type == 2) {
        /* stream 1: the producer makes the legacy default stream wait for
         * its pending writes; the engine's first copy runs there */
        PyObject *fn = PyObject_GetAttrString(obj, "__dlpack__");
        PyObject *noargs = PyTuple_New(0);
        PyObject *kw = Py_BuildValue("{s:i}", "stream", 1);
        cap = fn && noargs && kw ? PyObject_Call(fn, noargs, kw) : NULL;
        Py_XDECREF(fn);
        Py_XDECREF(noargs);
        Py_XDECREF(kw);
    } else {
        cap = PyObject_CallMethod(obj, "__dlpack__", NULL);
    }
    if (!cap)
        return -1;
    kvs_py_dl_managed_t *m = PyCapsule_GetPointer(cap, "dltensor");
    if (!m) {
        Py_DECREF(cap);
        return -1;
    }
    /* Ours now: the capsule must not call the deleter too. */
    if (PyCapsule_SetName(cap, "used_dltensor") < 0) {
        Py_DECREF(cap);
        return -1;
    }
    Py_DECREF(cap);
    a->dl = m;
    kvs_py_dl_tensor_t *t = &m->dl_tensor;
    if (t->device.device_type == 2 && cuda_ok && type == 2) {
        /* (a producer that hid its device from __dlpack_device__ was not
         * asked to order its writes: refused below) */
        a->cuda_device = t->device.device_id;
    } else if (t->device.device_type != 1 && t->device.device_type != 3) {
        PyErr_Format(PyExc_ValueError, "%s: device must be the CPU", arg);
        return -1;
    }
    if (t->ndim < 0 || t->ndim > KVS_PY_MAX_DIMS || t->dtype.lanes != 1) {
        PyErr_Format(PyExc_ValueError, "%s: unsupported DLPack layout", arg);
        return -1;
    }
    const char *fmt = NULL;
    if (t->dtype.code == 2 && t->dtype.bits == 32)
        fmt = "f";
    else if (t->dtype.code == 2 && t->dtype.bits == 16)
        fmt = "e";
    else if ((t->dtype.code == 4 || t->dtype.code == 1 || t->dtype.code == 0) &&
             t->dtype.bits == 16)
        fmt = "H"; /* bfloat16, or its bits as uint16 or int16 (what
                      torch's .view(torch.int16) gives: no torch.uint16
                      before 2.3) */
    else if (t->dtype.code == 0 && t->dtype.bits == 64)
        fmt = "q";
    else
        fmt = "?"; /* refused by the dtype check, which names the argument */
    int64_t expect = 1, n = 1;
    bool contiguous = true;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->strides && t->shape[i] != 1 && t->strides[i] != expect)
            contiguous = false;
        expect *= t->shape[i];
    }
    for (int i = 0; i < t->ndim; i++) {
        a->dl_shape[i] = (Py_ssize_t)t->shape[i];
        n *= t->shape[i];
    }
    if (!contiguous) {
        PyErr_Format(PyExc_ValueError,
                     "%s: must be C-contiguous (strides do not match its "
                     "shape); use .contiguous()",
                     arg);
        return -1;
    }
    memset(&a->view, 0, sizeof(a->view));
    a->view.buf = (char *)t->data + t->byte_offset;
    a->view.itemsize = (t->dtype.bits + 7) / 8;
    a->view.len = (Py_ssize_t)n * a->view.itemsize;
    a->view.ndim = t->ndim;
    a->view.shape = a->dl_shape;
    a->view.format = (char *)fmt;
    return 0;
}

/* Element kind of a buffer format: 'f' f32, 'e' f16, 'H' u16 or i16 (bf16
 * bits), 'q' i64; 0 for anything else. Byte-order prefixes of native order
 * are accepted. */
char kvs__py_format_kind(const char *fmt, Py_ssize_t itemsize) {
    if (!fmt)
        return itemsize == 1 ? 'B' : 0;
    if (*fmt == '@' || *fmt == '=' || *fmt == '<')
        fmt++;
    if (fmt[0] == 0 || fmt[1] != 0)
        return 0;
    switch (fmt[0]) {
    case 'f':
        return itemsize == 4 ? 'f' : 0;
    case 'e':
        return itemsize == 2 ? 'e' : 0;
    case 'H':
    case 'h':
        return itemsize == 2 ? 'H' : 0;
    case 'q':
    case 'l':
        return itemsize == 8 ? 'q' : 0;
    default:
        return 0;
    }
}

static int array_get(PyObject *obj, const char *arg, bool writable,
                     bool cuda_ok, kvs_py_array_t *a);

/* Get a C-contiguous view of `obj` named `arg` in errors. */
int kvs__py_array_get(PyObject *obj, const char *arg, bool writable,
                      kvs_py_array_t *a) {
    return array_get(obj, arg, writable, false, a);
}

int kvs__py_array_get_any(PyObject *obj, const char *arg, bool writable,
                          kvs_py_array_t *a) {
    return array_get(obj, arg, writable, true, a);
}

static int array_get(PyObject *obj, const char *arg, bool writable,
                     bool cuda_ok, kvs_py_array_t *a) {
    memset(a, 0, sizeof(*a));
    a->cuda_device = -1;
    int flags = PyBUF_RECORDS_RO | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_CheckBuffer(obj)) {
        Py_INCREF(obj);
        a->owner = obj;
    } else if (PyObject_HasAttrString(obj, "__dlpack__")) {
        /* torch tensors (CUDA ones only where cuda_ok). The producer
         * keeps the memory alive until we call its deleter. */
        if (array_get_dlpack(obj, arg, cuda_ok, a) < 0)
            goto err;
        return 0;
    } else if (PyObject_HasAttrString(obj, "__array__")) {
        /* torch CPU tensors: __array__() is a numpy view of the same
         * memory (a CUDA tensor raises here, which we pass on). */
        a->owner = PyObject_CallMethod(obj, "__array__", NULL);
        if (!a->owner)
            return -1;
        if (!PyObject_CheckBuffer(a->owner)) {
            PyErr_Format(PyExc_TypeError, "%s: __array__() gave no buffer",
                         arg);
            goto err;
        }
    } else {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected an array (buffer protocol or __array__), "
                     "got %.100s",
                     arg, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(a->owner, &a->view, flags) < 0) {
        PyErr_Clear();
        if (writable &&
            PyObject_GetBuffer(a->owner, &a->view, PyBUF_RECORDS_RO) == 0) {
            PyBuffer_Release(&a->view);
            PyErr_Format(PyExc_ValueError, "%s: array is read-only", arg);
        } else {
            PyErr_Format(PyExc_TypeError, "%s: cannot get its buffer", arg);
        }
        goto err;
    }
    a->held = true;
    if (!PyBuffer_IsContiguous(&a->view, 'C')) {
        PyErr_Format(PyExc_ValueError,
                     "%s: must be C-contiguous (strides %s); use "
                     "numpy.ascontiguousarray or .contiguous()",
                     arg, "do not match its shape");
        goto err;
    }
    return 0;
err:
    kvs__py_array_release(a);
    return -1;
}

/* Check the element kind and that the shape is `rows` x `cols` given as
 * (rows, cols), (rows, heads, dim) with heads*dim == cols, or flat
 * rows*cols when flat_ok. rows 0 means "any positive number" and is
 * returned through *rows_out. */
int kvs__py_array_check_shape(kvs_py_array_t *a, const char *arg,
                              char want_kind, const char *want_name,
                              uint64_t rows, uint64_t cols,
                              uint64_t *rows_out) {
    char kind = kvs__py_format_kind(a->view.format, a->view.itemsize);
    if (kind != want_kind) {
        PyErr_Format(PyExc_TypeError,
                     "%s: dtype must be %s (buffer format "
                     "'%s', itemsize %zd)",
                     arg, want_name, a->view.format ? a->view.format : "B",
                     a->view.itemsize);
        return -1;
    }
    int nd = a->view.ndim;
    const Py_ssize_t *sh = a->view.shape;
    uint64_t n_items = (uint64_t)(a->view.len / a->view.itemsize);
    uint64_t r = 0;
    if (nd == 2 && (uint64_t)sh[1] == cols)
        r = (uint64_t)sh[0];
    else if (nd == 3 && (uint64_t)sh[1] * (uint64_t)sh[2] == cols)
        r = (uint64_t)sh[0];
    else if (nd == 1 && cols && n_items % cols == 0 && rows)
        r = n_items / cols;
    if (cols == 0 || r == 0 || (rows && r != rows)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: shape does not fit: expected %s%llu rows of %llu "
                     "elements ([rows][heads][head_dim]), got %llu elements "
                     "in %d dimension(s)",
                     arg, rows ? "" : "n x ", (unsigned long long)rows,
                     (unsigned long long)cols, (unsigned long long)n_items, nd);
        return -1;
    }
    if (rows_out)
        *rows_out = r;
    return 0;
}

static PyObject *numpy_empty_fn; /* numpy.empty, imported lazily */

/* A new numpy array of the given shape and dtype ("float32", "int64"). */
PyObject *kvs__py_numpy_empty(Py_ssize_t d0, Py_ssize_t d1, const char *dtype) {
    if (!numpy_empty_fn) {
        PyObject *np = PyImport_ImportModule("numpy");
        if (!np)
            return NULL;
        numpy_empty_fn = PyObject_GetAttrString(np, "empty");
        Py_DECREF(np);
        if (!numpy_empty_fn)
            return NULL;
    }
    PyObject *shape = Py_BuildValue("(nn)", d0, d1);
    if (!shape)
        return NULL;
    PyObject *dt = PyUnicode_FromString(dtype);
    if (!dt) {
        Py_DECREF(shape);
        return NULL;
    }
    PyObject *args[2] = {shape, dt};
    PyObject *arr = PyObject_Vectorcall(numpy_empty_fn, args, 2, NULL);
    Py_DECREF(shape);
    Py_DECREF(dt);
    return arr;
}
