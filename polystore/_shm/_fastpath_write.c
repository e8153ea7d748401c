/*
 * polystore._shm._fastpath: the write path, a small put into a free block.
 *
 * It repeats the steady-state case of put() in write.py: a key seen before,
 * same dtype and shape, a free block of its class at hand; copied and
 * installed under the flock in one journaled section.
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
static void
log_set(Ctl *c, int64_t *p, int64_t v)
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

static int
pinned(Ctl *c, int64_t b)
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
static int
begin_section(Ctl *c, int fd, int64_t epoch, int64_t *wseq)
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
static int
guards_hold(Ctl *c, PyObject *absent, PyObject *present)
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
            PyObject *kbz = PyTuple_GET_ITEM(parts, 1), *h = PyTuple_GET_ITEM(parts, 2);
            if (!PyBytes_Check(kbz) || !PyLong_Check(h))
                return 0;
            int64_t hash = PyLong_AsLongLong(h);
            if (hash < 0 || hash > 0x7FFFFFFF) {
                PyErr_Clear();
                return 0;
            }
            Py_ssize_t n = PyBytes_GET_SIZE(kbz);
            if (!key_ok(c, n))
                return 0;
            int64_t e = fp_find(c, PyBytes_AS_STRING(kbz), n, hash);
            if (e == -2 || (e >= 0) != want)
                return 0;
        }
    }
    return 1;
}

static int
end_section(Ctl *c, int fd, int64_t wseq)
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
    int busy = pinned(c, b);
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
    log_set(c, head, next);
    if (next >= 0)
        log_set(c, &c->bq[next * f[F_BLK_FIELDS] + f[F_B_PREV]], -1);
    fp_step();
    memcpy((char *)dst.buf + off, src->buf, src->len);
    PyBuffer_Release(&dst);
    fp_step();
    log_set(c, &blk[f[F_B_STATE]], f[F_LIVE]);
    /* point the key at it */
    int64_t seq = h[f[F_H_SEQ]] + 1;
    log_set(c, &h[f[F_H_SEQ]], seq);
    log_set(c, &eq[f[F_E_BLOCK]], nb);
    log_set(c, &eq[f[F_E_SEQ]], seq);
    /* retire the old block, or put it back at the head of the list */
    if (busy) {
        log_set(c, &old[f[F_B_STATE]], f[F_RETIRED]);
    } else {
        int64_t first = *head;
        log_set(c, &old[f[F_B_STATE]], f[F_FREE]);
        log_set(c, &old[f[F_B_OWNER]], -1);
        log_set(c, &old[f[F_B_PREV]], -1);
        log_set(c, &old[f[F_B_NEXT]], first);
        if (first >= 0)
            log_set(c, &c->bq[first * f[F_BLK_FIELDS] + f[F_B_PREV]], b);
        log_set(c, head, b);
    }
    /* blocks in use per segment: one more for nb, one fewer for b if freed */
    int64_t more = 1, fewer = busy ? 0 : 1;
    if (s == s_old) {
        more -= fewer;
        fewer = 0;
    }
    if (more)
        log_set(c, &seg[f[F_S_USED]], seg[f[F_S_USED]] + more);
    if (fewer)
        log_set(c, &seg_old[f[F_S_USED]], seg_old[f[F_S_USED]] - fewer);
    fp_step();
    __atomic_store_n(&h[f[F_H_LOG_LEN]], 0, __ATOMIC_RELEASE);  /* the commit */
    return 1;
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
    int64_t wseq;
    int begun = begin_section(c, fd, epoch, &wseq);
    int done = begun;
    if (begun > 0) {
        int64_t e = fp_find(c, kbz, n, hash);
        done = e >= 0 && guards_hold(c, args[5], args[6])
                   ? swap_locked(c, e, &src, dtype, c->meta, c->rw_maps) : 0;
        /* an error of the copy stays set through the unlock */
        if (end_section(c, fd, wseq) < 0 && done >= 0)
            done = -1;
    }
    PyBuffer_Release(&src);
    Py_DECREF(dtype);
    if (done < 0)
        return NULL;
    return PyBool_FromLong(done);
}



/* -- publishing a value made in place (create) ------------------------------ */

/* Under the store lock, with an empty journal: install block b, which this
 * process filled in place (WRITING, owned by row slot), under a key that is
 * absent (slot i of the index, from fp_find), in a fresh entry (freed, or
 * never used and backed), as _install() in write.py does for a new key. Every check comes
 * before the first store. Returns 1 if done, 0 if declined.
 *
 * Invariant kept: the entry is written in full before the index slot that
 * names it (no reader can reach it before), and every store that others can
 * see is journaled, so a kill at any point leaves the key absent (rolled
 * back, the block still WRITING for the reaper) or published whole. */
static int
publish_locked(Ctl *c, int64_t i, int64_t slot, const char *kbz, Py_ssize_t n, int64_t hash,
               int64_t b, int64_t nbytes, PyObject *dt, PyObject *shape, int64_t flags)
{
    const int64_t *f = c->f;
    int64_t *h = c->h;
    int64_t *blk = c->bq + b * f[F_BLK_FIELDS];
    if (blk[f[F_B_STATE]] != f[F_WRITING] || blk[f[F_B_OWNER]] != slot)
        return 0;
    /* A freed entry, else the next never handed out if memory is behind it
     * (Tables.new_entry; backing more is the Python path's). */
    int64_t e = h[f[F_H_ENT_FREE]], fresh = e < 0;
    if (fresh)
        e = h[f[F_H_ENT_HW]];
    if (e < 0 || e >= c->max_keys || (fresh && e >= h[f[F_H_ENT_BACKED]]))
        return 0;
    int ndim = (int)PyTuple_GET_SIZE(shape);
    Py_ssize_t dlen = PyBytes_GET_SIZE(dt);
    int64_t extents[NPY_MAXDIMS];
    for (int j = 0; j < ndim; j++) {
        extents[j] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, j));
        if (extents[j] < 0) {
            PyErr_Clear();
            return 0;
        }
    }
    int64_t *eq = (int64_t *)(c->eb + e * f[F_ENT_SIZE]);
    char *eb = c->eb + e * f[F_ENT_SIZE];
    int64_t seq = h[f[F_H_SEQ]] + 1;
    log_set(c, &h[f[F_H_SEQ]], seq);
    if (fresh)
        log_set(c, &h[f[F_H_ENT_HW]], e + 1);
    else
        log_set(c, &h[f[F_H_ENT_FREE]], eq[f[F_E_NEXT]]);
    /* The entry, unjournaled as Tables.fill_entry() does: nothing names it
     * yet, and a rollback puts it back on the free list, whose rest hangs on
     * the link (E_NEXT) left alone here, or past the high-water mark. */
    fp_step();
    memcpy(eb + f[F_E_KEY], kbz, n);
    memcpy(eb + f[F_E_DTYPE], PyBytes_AS_STRING(dt), dlen);
    for (int j = 0; j < ndim; j++)
        eq[f[F_E_SHAPE] / 8 + j] = extents[j];
    eq[f[F_E_META]] = (int64_t)(n - 1) | (int64_t)ndim << 16 | flags << 24 | (int64_t)dlen << 32;
    eq[f[F_E_BLOCK]] = b;
    eq[f[F_E_NBYTES]] = nbytes;
    eq[f[F_E_SEQ]] = seq;
    eq[f[F_E_MSEQ]] = seq;
    fp_step();
    /* link it into the index (the release store orders it after the entry) */
    log_set(c, &c->ht[i], hash << 32 | (e + 1));
    log_set(c, &h[f[F_H_NKEYS]], h[f[F_H_NKEYS]] + 1);
    log_set(c, &blk[f[F_B_STATE]], f[F_LIVE]);
    log_set(c, &blk[f[F_B_OWNER]], -1);
    fp_step();
    __atomic_store_n(&h[f[F_H_LOG_LEN]], 0, __ATOMIC_RELEASE);  /* the commit */
    return 1;
}

/* -- taking a block (create, a large put) ----------------------------------- */

/* Under the store lock, with an empty journal: take the block at the head of
 * class cls's free list for row slot to fill, as pop_free() in alloc.py does
 * when that list is not empty. Returns the block, or -1 if declined.
 *
 * Invariant kept: the block moves from its free list to WRITING, owned by
 * this process, in one journaled section, so it is on the list or owned
 * (and taken back by the reaper if this process dies), never lost. */
static int64_t
take_locked(Ctl *c, int64_t cls, int64_t slot)
{
    const int64_t *f = c->f;
    int64_t *h = c->h;
    if (cls < 0 || cls >= c->n_classes)
        return -1;
    int64_t *head = &h[f[F_H_CLASS0] + cls];
    int64_t b = *head;
    if (b < 0 || b >= c->max_blocks)
        return -1;
    int64_t *blk = c->bq + b * f[F_BLK_FIELDS];
    int64_t next = blk[f[F_B_NEXT]], s = blk[f[F_B_SEG]];
    if (blk[f[F_B_STATE]] != f[F_FREE] || next >= c->max_blocks || s < 0 || s >= c->max_segs)
        return -1;
    int64_t *seg = c->sq + s * f[F_SEG_FIELDS];
    log_set(c, head, next);
    if (next >= 0)
        log_set(c, &c->bq[next * f[F_BLK_FIELDS] + f[F_B_PREV]], -1);
    log_set(c, &blk[f[F_B_STATE]], f[F_WRITING]);
    log_set(c, &blk[f[F_B_OWNER]], slot);
    int64_t used = seg[f[F_S_USED]] + 1;
    log_set(c, &seg[f[F_S_USED]], used);
    if (used == 1)  /* the segment was idle: it leaves the reuse cache */
        log_set(c, &h[f[F_H_IDLE]], h[f[F_H_IDLE]] - seg[f[F_S_SIZE]]);
    fp_step();
    __atomic_store_n(&h[f[F_H_LOG_LEN]], 0, __ATOMIC_RELEASE);  /* the commit */
    return b;
}

FP_INTERNAL PyObject *
fp_take_impl(Ctl *c, PyObject *const *args)
{
    if (!ctl_live(c))
        return NULL;
    int fd = PyLong_AsLong(args[0]);
    int64_t epoch = PyLong_AsLongLong(args[1]);
    int64_t slot = PyLong_AsLongLong(args[2]);
    int64_t cls = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || slot < 0 || slot >= c->max_procs)
        return PyLong_FromLong(-1);
    int64_t wseq;
    int begun = begin_section(c, fd, epoch, &wseq);
    if (begun <= 0)
        return begun < 0 ? NULL : PyLong_FromLong(-1);
    int64_t b = take_locked(c, cls, slot);
    if (end_section(c, fd, wseq) < 0)
        return NULL;  /* (taken, if b >= 0: the block stays WRITING, for the reaper) */
    return PyLong_FromLongLong(b);
}

FP_INTERNAL PyObject *
fp_publish_impl(Ctl *c, PyObject *const *args)
{
    if (!PyBytes_Check(args[3]) || !PyBytes_Check(args[7]) || !PyTuple_Check(args[8])) {
        PyErr_SetString(PyExc_TypeError, "publish(): kbz and dt must be bytes, shape a tuple");
        return NULL;
    }
    if (!ctl_live(c))
        return NULL;
    int fd = PyLong_AsLong(args[0]);
    int64_t epoch = PyLong_AsLongLong(args[1]);
    int64_t slot = PyLong_AsLongLong(args[2]);
    int64_t hash = PyLong_AsLongLong(args[4]);
    int64_t b = PyLong_AsLongLong(args[5]);
    int64_t nbytes = PyLong_AsLongLong(args[6]);
    int64_t flags = PyLong_AsLongLong(args[9]);
    if (PyErr_Occurred())
        return NULL;
    const char *kbz = PyBytes_AS_STRING(args[3]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[3]);
    const int64_t *f = c->f;
    if (fd < 0 || slot < 0 || slot >= c->max_procs || !key_ok(c, n) || b < 0
            || b >= c->max_blocks || nbytes <= 0 || flags < 0 || flags > 0xFF
            || hash < 0 || hash > 0x7FFFFFFF || PyTuple_GET_SIZE(args[8]) > NPY_MAXDIMS
            || PyTuple_GET_SIZE(args[8]) > (f[F_ENT_SIZE] - f[F_E_SHAPE]) / 8
            || PyBytes_GET_SIZE(args[7]) < 1
            || PyBytes_GET_SIZE(args[7]) > f[F_E_SHAPE] - f[F_E_DTYPE])
        Py_RETURN_FALSE;
    int64_t wseq;
    int begun = begin_section(c, fd, epoch, &wseq);
    if (begun <= 0)
        return begun < 0 ? NULL : Py_NewRef(Py_False);
    int done = 0;
    /* fp_find gives the entry, not the slot: probe for the empty slot */
    if (fp_find(c, kbz, n, hash) == -1 && guards_hold(c, args[10], args[11])) {
        int64_t i = hash & c->mask;
        while (LD(&c->ht[i]) != 0)
            i = (i + 1) & c->mask;
        done = publish_locked(c, i, slot, kbz, n, hash, b, nbytes, args[7], args[8], flags);
    }
    if (end_section(c, fd, wseq) < 0)
        return NULL;
    return PyBool_FromLong(done);
}

/* -- removing a key, and its companion (a file's delete) --------------------- */

/* What removing an entry does to its block, found before the first store. */
typedef struct {
    int64_t e, slot_hash, b, s;
    int busy;  /* the block is pinned: RETIRED rather than freed */
} Doomed;

/* Fill d for entry e, checking its block. 1 if the C path can remove it, 0
 * to decline (a block in a state only the Python path handles). */
static int
check_doomed(Ctl *c, int64_t e, int64_t hash, Doomed *d)
{
    const int64_t *f = c->f;
    const int64_t *eq = (const int64_t *)(c->eb + e * f[F_ENT_SIZE]);
    d->e = e;
    d->slot_hash = hash;
    d->b = eq[f[F_E_BLOCK]];
    d->s = -1;
    d->busy = 0;
    if (d->b == -1)
        return 1;  /* a value with no data: nothing to give back */
    if (d->b < 0 || d->b >= c->max_blocks)
        return 0;
    const int64_t *blk = c->bq + d->b * f[F_BLK_FIELDS];
    d->s = blk[f[F_B_SEG]];
    if (blk[f[F_B_STATE]] != f[F_LIVE] || d->s < 0 || d->s >= c->max_segs
            || blk[f[F_B_CLS]] < 0 || blk[f[F_B_CLS]] >= c->n_classes)
        return 0;
    d->busy = pinned(c, d->b);
    /* the head of its free list, which a freed block goes in front of */
    return d->busy || c->h[f[F_H_CLASS0] + blk[f[F_B_CLS]]] < c->max_blocks;
}

/* Slots from i to the next empty one (the run a removal at i can shift). */
static int64_t
run_from(Ctl *c, int64_t i)
{
    int64_t n = 0;
    while (n <= c->mask && c->ht[i] != 0) {
        n++;
        i = (i + 1) & c->mask;
    }
    return n;
}

/* The slot of the index that names entry e of a key with this hash, or -1. */
static int64_t
slot_of(Ctl *c, int64_t e, int64_t hash)
{
    int64_t want = hash << 32 | (e + 1), i = hash & c->mask;
    for (int64_t probe = 0; probe <= c->mask && c->ht[i] != 0; probe++) {
        if (c->ht[i] == want)
            return i;
        i = (i + 1) & c->mask;
    }
    return -1;
}

/* Under the store lock, checks done: remove the key in slot i (entry d->e),
 * as Tables.remove() and write.remove() do: empty the slot and shift back
 * the keys after it whose probe runs crossed it, free the entry, then free
 * the block (or retire it while a view pins it). Every store journaled. */
static void
remove_locked(Ctl *c, const Doomed *d, int64_t i)
{
    const int64_t *f = c->f;
    int64_t *h = c->h, mask = c->mask;
    log_set(c, &c->ht[i], 0);
    int64_t j = i;
    for (int64_t probe = 0; probe < mask; probe++) {
        j = (j + 1) & mask;
        int64_t v = c->ht[j];
        if (v == 0)
            break;
        int64_t home = (v >> 32) & mask;
        /* the key in j stays if its home lies cyclically in (i, j] */
        int stays = i <= j ? (i < home && home <= j) : (home > i || home <= j);
        if (!stays) {
            log_set(c, &c->ht[i], v);
            log_set(c, &c->ht[j], 0);
            i = j;
        }
    }
    log_set(c, &h[f[F_H_NKEYS]], h[f[F_H_NKEYS]] - 1);
    int64_t *eq = (int64_t *)(c->eb + d->e * f[F_ENT_SIZE]);
    log_set(c, &eq[f[F_E_NEXT]], h[f[F_H_ENT_FREE]]);
    log_set(c, &h[f[F_H_ENT_FREE]], d->e);
    if (d->b < 0)
        return;
    int64_t *blk = c->bq + d->b * f[F_BLK_FIELDS];
    if (d->busy) {
        log_set(c, &blk[f[F_B_STATE]], f[F_RETIRED]);
        return;
    }
    int64_t *head = &h[f[F_H_CLASS0] + blk[f[F_B_CLS]]];
    int64_t first = *head;
    log_set(c, &blk[f[F_B_STATE]], f[F_FREE]);
    log_set(c, &blk[f[F_B_OWNER]], -1);
    log_set(c, &blk[f[F_B_PREV]], -1);
    log_set(c, &blk[f[F_B_NEXT]], first);
    if (first >= 0)
        log_set(c, &c->bq[first * f[F_BLK_FIELDS] + f[F_B_PREV]], d->b);
    log_set(c, head, d->b);
    int64_t *seg = c->sq + d->s * f[F_SEG_FIELDS];
    int64_t used = seg[f[F_S_USED]] - 1;
    log_set(c, &seg[f[F_S_USED]], used);
    if (used == 0) {  /* idle now: into the reuse cache, stamped for eviction order */
        log_set(c, &h[f[F_H_IDLE]], h[f[F_H_IDLE]] + seg[f[F_S_SIZE]]);
        log_set(c, &seg[f[F_S_STAMP]], h[f[F_H_SEQ]]);
    }
}

/* Under the store lock, with an empty journal: remove entries d[0..n) (n is
 * 1 or 2, different entries). Every check comes before the first store; the
 * Python path (write.remove, then Arena.release) takes what C declines: a
 * segment that goes idle beyond the cache, or spilled, must be evicted when
 * the section ends. 1 if done, 0 if declined.
 *
 * Invariant kept: a key and its companion (a file and its metadata) go in
 * one journaled section, so a kill at any point leaves both (rolled back by
 * the next lock holder) or neither. */
static int
remove_all_locked(Ctl *c, Doomed *d, int n)
{
    const int64_t *f = c->f;
    int64_t *h = c->h;
    int64_t idle = h[f[F_H_IDLE]], records = 0;
    for (int k = 0; k < n; k++) {
        int64_t i = slot_of(c, d[k].e, d[k].slot_hash);
        if (i < 0)
            return 0;
        records += 2 * run_from(c, i) + 16;
        int frees = d[k].b >= 0 && !d[k].busy;
        int with_next = k == 0 && n == 2 && d[1].b >= 0 && !d[1].busy && d[1].s == d[0].s;
        if (!frees || (k == 1 && d[0].b >= 0 && !d[0].busy && d[0].s == d[1].s))
            continue;  /* (two blocks of one segment are counted together, at k = 0) */
        int64_t *seg = c->sq + d[k].s * f[F_SEG_FIELDS];
        int64_t freed = 1 + with_next;
        if (seg[f[F_S_USED]] < freed)
            return 0;
        if (seg[f[F_S_USED]] == freed) {
            if (seg[f[F_S_SPILL]])
                return 0;
            idle += seg[f[F_S_SIZE]];
        }
    }
    if (idle > h[f[F_H_CACHE_BYTES]] || records > f[F_LOG_RECORDS])
        return 0;
    for (int k = 0; k < n; k++) {
        /* (the second key's slot may have moved back with the first removal) */
        int64_t i = slot_of(c, d[k].e, d[k].slot_hash);
        if (i < 0)  /* only a corrupt index: left to the next holder's rollback */
            return -1;
        remove_locked(c, &d[k], i);
    }
    fp_step();
    __atomic_store_n(&h[f[F_H_LOG_LEN]], 0, __ATOMIC_RELEASE);  /* the commit */
    return 1;
}

/* The key's parts (bytes and NUL, hash) from two arguments: 1, or 0 if they
 * are not of a valid key. */
static int
parse_key(Ctl *c, PyObject *kbz, PyObject *hash_obj, int64_t *hash)
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

FP_INTERNAL PyObject *
fp_remove_impl(Ctl *c, PyObject *const *args)
{
    if (c->meta == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ctl.bind() was not called");
        return NULL;
    }
    if (!ctl_live(c))
        return NULL;
    int fd = PyLong_AsLong(args[0]);
    int64_t epoch = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    int64_t hash, chash = 0;
    int with_companion = args[4] != NULL;
    if (fd < 0 || !parse_key(c, args[2], args[3], &hash)
            || (with_companion && !parse_key(c, args[4], args[5], &chash)))
        Py_RETURN_NONE;
    int64_t wseq;
    int begun = begin_section(c, fd, epoch, &wseq);
    if (begun <= 0)
        return begun < 0 ? NULL : Py_NewRef(Py_None);
    int done = 0;  /* 1 removed, 2 absent, 0 declined, -1 left for a rollback */
    int64_t e = fp_find(c, PyBytes_AS_STRING(args[2]), PyBytes_GET_SIZE(args[2]), hash);
    int64_t ce = -1;
    if (e == -1) {
        done = 2;
    } else if (e >= 0 && with_companion) {
        ce = fp_find(c, PyBytes_AS_STRING(args[4]), PyBytes_GET_SIZE(args[4]), chash);
    }
    Doomed d[2];
    if (e >= 0 && ce != -2 && ce != e && check_doomed(c, e, hash, &d[0])
            && (ce < 0 || check_doomed(c, ce, chash, &d[1])))
        done = remove_all_locked(c, d, ce >= 0 ? 2 : 1);
    if (done == -1) {
        /* Half done: leave it as a dead holder would, the write counter odd
         * (lock-free readers go to the lock) and the journal uncommitted,
         * for the next holder (Arena.acquire) to roll back. */
        if (flock(fd, LOCK_UN) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        Py_RETURN_NONE;
    }
    if (end_section(c, fd, wseq) < 0)
        return NULL;
    if (done == 1) {
        /* this process's cached descriptions of the freed entries */
        for (int k = 0; k < (ce >= 0 ? 2 : 1); k++) {
            PyObject *key = PyLong_FromLongLong(d[k].e);
            if (key == NULL)
                return NULL;
            int gone = PyDict_DelItem(c->meta, key);
            Py_DECREF(key);
            if (gone < 0) {
                if (!PyErr_ExceptionMatches(PyExc_KeyError))
                    return NULL;
                PyErr_Clear();
            }
        }
        Py_RETURN_TRUE;
    }
    if (done == 2)
        Py_RETURN_FALSE;
    Py_RETURN_NONE;
}
