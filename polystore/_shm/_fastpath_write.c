/*
 * polystore._shm._fastpath: the write path, a small put that overwrites in place.
 *
 * It repeats the steady-state case of put() in _shm_write.py: the key's own
 * block, same dtype and shape, no view of it anywhere, copied under the flock.
 */
#define NO_IMPORT_ARRAY
#include "_fastpath.h"

/* Whether entry e holds a plain array (no flags) of exactly src's dtype and
 * shape: its description cached in meta[e] is current (E_MSEQ), names the
 * very dtype object of src, and has src's shape; the entry agrees. */
static int
same_description(Ctl *c, int64_t e, const int64_t *eq, Py_buffer *src, PyObject *dtype,
                 PyObject *meta_dict)
{
    const int64_t *f = c->f;
    PyObject *meta;
    int cached = fp_item_of(meta_dict, e, &meta);
    if (cached <= 0)
        return cached;
    /* meta: (mseq, dtype, shape, count, order, flags, dt) */
    if (!PyTuple_Check(meta) || PyTuple_GET_SIZE(meta) != 7
            || PyTuple_GET_ITEM(meta, 1) != dtype || !PyTuple_Check(PyTuple_GET_ITEM(meta, 2)))
        return 0;
    long long mseq = PyLong_AsLongLong(PyTuple_GET_ITEM(meta, 0));
    long long flags = PyLong_AsLongLong(PyTuple_GET_ITEM(meta, 5));
    if (PyErr_Occurred())
        return -1;
    if (mseq != eq[f[F_E_MSEQ]] || flags != 0)
        return 0;
    PyObject *shape = PyTuple_GET_ITEM(meta, 2);
    if (PyTuple_GET_SIZE(shape) != src->ndim)
        return 0;
    for (int j = 0; j < src->ndim; j++) {
        long long extent = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, j));
        if (extent == -1 && PyErr_Occurred())
            return -1;
        if (extent != src->shape[j])
            return 0;
    }
    int64_t word = eq[f[F_E_META]];
    return ((word >> 16) & 0xFF) == src->ndim && ((word >> 24) & 0xFF) == 0
           && eq[f[F_E_NBYTES]] == src->len;
}

/* Index of the smallest size class that holds n bytes (ix.class_of). */
static int64_t
class_of(Ctl *c, int64_t n)
{
    int64_t lo = 0, hi = c->n_classes;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (c->class_sizes[mid] < n)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Under the store lock: copy src over entry e's block if the Python path would
 * do just that. Returns 1 if done, 0 if declined, -1 with an exception set. */
static int
overwrite_locked(Ctl *c, int64_t e, Py_buffer *src, PyObject *dtype, PyObject *meta,
                 PyObject *rw_maps)
{
    const int64_t *f = c->f;
    int64_t *eq = (int64_t *)(c->eb + e * f[F_ENT_SIZE]);
    int64_t b = eq[f[F_E_BLOCK]];
    if (b < 0 || b >= c->max_blocks)
        return 0;
    int same = same_description(c, e, eq, src, dtype, meta);
    if (same <= 0)
        return same;
    const int64_t *blk = c->bq + b * f[F_BLK_FIELDS];
    if (blk[f[F_B_CLS]] != class_of(c, src->len))
        return 0;
    /* Pinned? The odd write counter and the fence before this made every
     * reader that pins from now on see us and back off. */
    int64_t procs = c->h[f[F_H_PROC_HW]];
    if (procs > c->max_procs)
        procs = c->max_procs;
    for (int64_t p = 0; p < procs; p++)
        if (LD(&c->pins[p * c->max_blocks + b]))
            return 0;
    int64_t s = blk[f[F_B_SEG]], off = blk[f[F_B_OFF]];
    if (s < 0 || s >= c->max_segs || off < 0)
        return 0;
    int64_t gen = c->sq[s * f[F_SEG_FIELDS] + f[F_S_GEN]];

    PyObject *mm;
    int mapped = fp_mapping_at(rw_maps, s, gen, &mm);
    if (mapped <= 0)
        return mapped;
    Py_buffer dst;
    if (PyObject_GetBuffer(mm, &dst, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();  /* the Python path meets the same error and reports it */
        return 0;
    }
    int done = 0;
    if (off + src->len <= dst.len) {
        memcpy((char *)dst.buf + off, src->buf, src->len);
        int64_t seq = c->h[f[F_H_SEQ]] + 1;
        c->h[f[F_H_SEQ]] = seq;
        ST(&eq[f[F_E_SEQ]], seq);
        done = 1;
    }
    PyBuffer_Release(&dst);
    return done;
}


FP_INTERNAL PyObject *
fp_put_impl(Ctl *c, PyObject *const *args)
{
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "kbz must be bytes");
        return NULL;
    }
    if (c->meta == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ctl.bind() was not called");
        return NULL;
    }
    if (!ctl_live(c))
        return NULL;
    int fd = PyLong_AsLong(args[0]);
    const char *kbz = PyBytes_AS_STRING(args[1]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[1]);
    int64_t hash = PyLong_AsLongLong(args[2]);
    int64_t epoch = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || !key_ok(c, n))
        Py_RETURN_FALSE;
    PyObject *dtype = PyObject_GetAttr(args[4], fp_str_dtype);
    if (dtype == NULL) {
        PyErr_Clear();  /* not an array: the Python path converts it */
        Py_RETURN_FALSE;
    }
    Py_buffer src;
    /* C_CONTIGUOUS asks for the shape too, so no tuple is made for it */
    if (PyObject_GetBuffer(args[4], &src, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        Py_DECREF(dtype);
        Py_RETURN_FALSE;
    }
    if (src.len <= 0 || src.len > c->small_put || src.ndim > 64
            || (src.ndim > 0 && src.shape == NULL)) {
        PyBuffer_Release(&src);
        Py_DECREF(dtype);
        Py_RETURN_FALSE;
    }
    /* The caller saw no thread of this process in the store, and the GIL is
     * not given up from here to the unlock, so none can come in: the flock,
     * shared by the threads of a process, is ours alone. Another process
     * holding it sends this put to the Python path, which waits. */
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        PyBuffer_Release(&src);
        Py_DECREF(dtype);
        if (errno == EWOULDBLOCK || errno == EINTR)
            Py_RETURN_FALSE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    const int64_t *f = c->f;
    int64_t *h = c->h;
    int done = 0;
    if (!h[f[F_H_CLOSED]] && h[f[F_H_EPOCH]] == epoch) {
        /* Tell lock-free readers a writer is in, as Arena.acquire() does. */
        int64_t wseq = h[f[F_H_WSEQ]];
        __atomic_store_n(&h[f[F_H_WSEQ]], (wseq & 1) ? wseq + 2 : wseq + 1, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int64_t e = fp_find(c, kbz, n, hash);
        if (e >= 0)
            done = overwrite_locked(c, e, &src, dtype, c->meta, c->rw_maps);
        __atomic_store_n(&h[f[F_H_WSEQ]], h[f[F_H_WSEQ]] + 1, __ATOMIC_RELEASE);
    }
    PyBuffer_Release(&src);
    Py_DECREF(dtype);
    /* flock() leaves Python's error state alone: an error of the copy stays set */
    if (flock(fd, LOCK_UN) < 0 && done >= 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    if (done < 0)
        return NULL;
    return PyBool_FromLong(done);
}


