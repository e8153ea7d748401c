/*
 * polystore._shm._fastpath: the write path's sections, and a small put.
 *
 * The helpers of every locked section in C (begin and end one, the journal,
 * the checks of related keys and pins), and the steady-state case of put()
 * in write.py: a key seen before, same dtype and shape, a free block of its
 * class at hand; copied and installed under the flock in one journaled
 * section. The sections that add and remove keys are in _fastpath_keys.c.
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

/* Journaled store, as Tables.set() in tables.py: the record (index, old value)
 * is written, then counted, then the value stored. The release stores keep
 * that order against the compiler (x86 keeps it in the processor), so a
 * counted record always names a store that was made or not yet made. */
FP_INTERNAL void
fp_log_set(Ctl *c, int64_t *p, int64_t v)
{
    const int64_t *f = c->f;
    int64_t *len = &c->h[f[F_H_LOG_LEN]];
    fp_step();
    int64_t n = *len;
    c->log[2 * n] = p - c->h;
    c->log[2 * n + 1] = *p;
    __atomic_store_n(len, n + 1, __ATOMIC_RELEASE);
    fp_step();
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

FP_INTERNAL int
fp_pinned(Ctl *c, int64_t b)
{
    int64_t procs = c->h[c->f[F_H_PROC_HW]];
    if (procs > c->max_procs)
        procs = c->max_procs;
    for (int64_t p = 0; p < procs; p++)
        if (LD(&c->pins[p * c->max_blocks + b]))
            return 1;
    return 0;
}

/* Begin a locked section in C: take the flock without waiting and check that
 * no dead holder left work (an odd counter, a journal, unlinks: then
 * Arena.acquire() must finish it first) and that the store is as the caller
 * last saw it. 1 if begun (end it with end_section), 0 if declined, -1 with
 * an exception set. The caller saw no thread of this process in the store,
 * and the GIL is held from here to the unlock, so none can come in: the
 * flock, shared by the threads of a process, is ours alone. Another process
 * holding it sends the caller to the Python path, which waits. */
FP_INTERNAL int
fp_begin_section(Ctl *c, int fd, int64_t epoch, int64_t *wseq)
{
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    const int64_t *f = c->f;
    int64_t *h = c->h;
    *wseq = h[f[F_H_WSEQ]];
    if (h[f[F_H_CLOSED]] || h[f[F_H_EPOCH]] != epoch || (*wseq & 1)
            || h[f[F_H_LOG_LEN]] != 0 || h[f[F_H_UNLINK_N]] != 0) {
        flock(fd, LOCK_UN);
        return 0;
    }
    /* Tell lock-free readers a writer is in, as Arena.acquire() does. */
    __atomic_store_n(&h[f[F_H_WSEQ]], *wseq + 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return 1;
}

/* Under the store lock: whether every key of absent is absent and every key
 * of present is present. Each is NULL (nothing to check) or a tuple of key
 * parts, (bytes, bytes and NUL, hash) as polystore._shm.keys.key_parts makes them.
 * 0 when one is not so, or cannot be read: the caller declines, and the
 * Python path does the work in a section of its own (write.commit), which
 * removes what must go, makes what must be there and refuses what is in
 * the way.
 *
 * Invariant kept: a value is never installed in C apart from the keys that
 * go with it (polystore.shm_backend: a file's old metadata removed, its
 * directories there, no file in their place), since C installs only when
 * there is nothing to do for them, checked in the same section. */
FP_INTERNAL int
fp_parse_key(Ctl *c, PyObject *kbz, PyObject *hash_obj, int64_t *hash)
{
    if (!PyBytes_Check(kbz) || !PyLong_Check(hash_obj) || !key_ok(c, PyBytes_GET_SIZE(kbz)))
        return 0;
    *hash = PyLong_AsLongLong(hash_obj);
    if (*hash < 0 || *hash > 0x7FFFFFFF) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

FP_INTERNAL int
fp_guards_hold(Ctl *c, PyObject *absent, PyObject *present)
{
    PyObject *lists[2] = {absent, present};
    for (int want = 0; want < 2; want++) {
        PyObject *keys = lists[want];
        if (keys == NULL || keys == Py_None)
            continue;
        if (!PyTuple_Check(keys))
            return 0;
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(keys); j++) {
            PyObject *parts = PyTuple_GET_ITEM(keys, j);
            if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 3)
                return 0;
            PyObject *kbz = PyTuple_GET_ITEM(parts, 1);
            int64_t hash;
            if (!fp_parse_key(c, kbz, PyTuple_GET_ITEM(parts, 2), &hash))
                return 0;
            int64_t e = fp_find(c, PyBytes_AS_STRING(kbz), PyBytes_GET_SIZE(kbz), hash);
            if (e == -2 || (e >= 0) != want)
                return 0;
        }
    }
    return 1;
}

FP_INTERNAL int
fp_end_section(Ctl *c, int fd, int64_t wseq)
{
    __atomic_store_n(&c->h[c->f[F_H_WSEQ]], wseq + 2, __ATOMIC_RELEASE);
    if (flock(fd, LOCK_UN) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* Under the store lock, with an empty journal: put src under entry e into the
 * free block at the head of its class's list, as put() in write.py would.
 * Every check comes before the first store. Returns 1 if done, 0 if declined,
 * -1 with an exception set.
 *
 * Invariant kept: the bytes go into a block no key names (it was free), and
 * the key moves to it in the same journaled section, so a kill at any point
 * leaves the key's old value whole (rolled back by the next lock holder) or
 * the new one committed. */
static int
swap_locked(Ctl *c, int64_t e, Py_buffer *src, PyObject *dtype, PyObject *meta,
            PyObject *rw_maps)
{
    const int64_t *f = c->f;
    int64_t *h = c->h;
    int64_t *eq = (int64_t *)(c->eb + e * f[F_ENT_SIZE]);
    int64_t b = eq[f[F_E_BLOCK]];
    if (b < 0 || b >= c->max_blocks)
        return 0;
    int same = same_description(c, e, eq, src, dtype, meta);
    if (same <= 0)
        return same;
    int64_t cls = class_of(c, src->len);
    int64_t *old = c->bq + b * f[F_BLK_FIELDS];
    if (cls >= c->n_classes || old[f[F_B_CLS]] != cls)
        return 0;
    int64_t *head = &h[f[F_H_CLASS0] + cls];
    int64_t nb = *head;
    if (nb < 0 || nb >= c->max_blocks || nb == b)
        return 0;
    int64_t *blk = c->bq + nb * f[F_BLK_FIELDS];
    int64_t s = blk[f[F_B_SEG]], off = blk[f[F_B_OFF]], s_old = old[f[F_B_SEG]];
    int64_t next = blk[f[F_B_NEXT]];
    if (s < 0 || s >= c->max_segs || s_old < 0 || s_old >= c->max_segs || off < 0
            || next >= c->max_blocks || blk[f[F_B_STATE]] != f[F_FREE])
        return 0;
    int64_t *seg = c->sq + s * f[F_SEG_FIELDS], *seg_old = c->sq + s_old * f[F_SEG_FIELDS];
    int busy = fp_pinned(c, b);
    /* A segment that turns busy or idle changes the idle accounting and may
     * call for eviction: the Python path does that. */
    if (s != s_old && (seg[f[F_S_USED]] == 0 || (!busy && seg_old[f[F_S_USED]] <= 1)))
        return 0;
    PyObject *mm;
    int mapped = fp_mapping_at(rw_maps, s, seg[f[F_S_GEN]], &mm);
    if (mapped <= 0)
        return mapped;
    Py_buffer dst;
    if (PyObject_GetBuffer(mm, &dst, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();  /* the Python path meets the same error and reports it */
        return 0;
    }
    if (off + src->len > dst.len) {
        PyBuffer_Release(&dst);
        return 0;
    }
    /* take nb off its free list */
    fp_log_set(c, head, next);
    if (next >= 0)
        fp_log_set(c, &c->bq[next * f[F_BLK_FIELDS] + f[F_B_PREV]], -1);
    fp_step();
    memcpy((char *)dst.buf + off, src->buf, src->len);
    PyBuffer_Release(&dst);
    fp_step();
    fp_log_set(c, &blk[f[F_B_STATE]], f[F_LIVE]);
    /* point the key at it */
    int64_t seq = h[f[F_H_SEQ]] + 1;
    fp_log_set(c, &h[f[F_H_SEQ]], seq);
    fp_log_set(c, &eq[f[F_E_BLOCK]], nb);
    fp_log_set(c, &eq[f[F_E_SEQ]], seq);
    /* retire the old block, or put it back at the head of the list */
    if (busy) {
        fp_log_set(c, &old[f[F_B_STATE]], f[F_RETIRED]);
    } else {
        int64_t first = *head;
        fp_log_set(c, &old[f[F_B_STATE]], f[F_FREE]);
        fp_log_set(c, &old[f[F_B_OWNER]], -1);
        fp_log_set(c, &old[f[F_B_PREV]], -1);
        fp_log_set(c, &old[f[F_B_NEXT]], first);
        if (first >= 0)
            fp_log_set(c, &c->bq[first * f[F_BLK_FIELDS] + f[F_B_PREV]], b);
        fp_log_set(c, head, b);
    }
    /* blocks in use per segment: one more for nb, one fewer for b if freed */
    int64_t more = 1, fewer = busy ? 0 : 1;
    if (s == s_old) {
        more -= fewer;
        fewer = 0;
    }
    if (more)
        fp_log_set(c, &seg[f[F_S_USED]], seg[f[F_S_USED]] + more);
    if (fewer)
        fp_log_set(c, &seg_old[f[F_S_USED]], seg_old[f[F_S_USED]] - fewer);
    fp_step();
    __atomic_store_n(&h[f[F_H_LOG_LEN]], 0, __ATOMIC_RELEASE);  /* the commit */
    return 1;
}


FP_INTERNAL PyObject *
fp_put_impl(Ctl *c, PyObject *const *args)
{
    if (!PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "kbz must be bytes");
        return NULL;
    }
    if (!ctl_bound(c))
        return NULL;
    int fd = PyLong_AsLong(args[0]);
    int64_t epoch = PyLong_AsLongLong(args[1]);
    const char *kbz = PyBytes_AS_STRING(args[3]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[3]);
    int64_t hash = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || !key_ok(c, n))
        Py_RETURN_FALSE;
    PyObject *dtype = PyObject_GetAttr(args[5], fp_str_dtype);
    if (dtype == NULL) {
        PyErr_Clear();  /* not an array: the Python path converts it */
        Py_RETURN_FALSE;
    }
    Py_buffer src;
    /* C_CONTIGUOUS asks for the shape too, so no tuple is made for it */
    if (PyObject_GetBuffer(args[5], &src, PyBUF_C_CONTIGUOUS) < 0) {
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
    int64_t wseq;
    int begun = fp_begin_section(c, fd, epoch, &wseq);
    int done = begun;
    if (begun > 0) {
        int64_t e = fp_find(c, kbz, n, hash);
        done = e >= 0 && fp_guards_hold(c, args[6], args[7])
                   ? swap_locked(c, e, &src, dtype, c->meta, c->rw_maps) : 0;
        /* an error of the copy stays set through the unlock */
        if (fp_end_section(c, fd, wseq) < 0 && done >= 0)
            done = -1;
    }
    PyBuffer_Release(&src);
    Py_DECREF(dtype);
    if (done < 0)
        return NULL;
    return PyBool_FromLong(done);
}
