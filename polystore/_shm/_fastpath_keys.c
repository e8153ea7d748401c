/*
 * polystore._shm._fastpath: the sections that add and remove keys.
 *
 * The end of create() for a new key (a value made in place, published in a
 * fresh entry), the taking of a free block for create() or a large put, and
 * the removal of a key with its companion (a file's delete with its
 * metadata); each one journaled section under the flock, with the helpers
 * of _fastpath_write.c, declining to the Python path in write.py whatever it
 * cannot finish as it stands.
 */
#define NO_IMPORT_ARRAY
#include "_fastpath.h"

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
    fp_log_set(c, &h[f[F_H_SEQ]], seq);
    if (fresh)
        fp_log_set(c, &h[f[F_H_ENT_HW]], e + 1);
    else
        fp_log_set(c, &h[f[F_H_ENT_FREE]], eq[f[F_E_NEXT]]);
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
    fp_log_set(c, &c->ht[i], hash << 32 | (e + 1));
    fp_log_set(c, &h[f[F_H_NKEYS]], h[f[F_H_NKEYS]] + 1);
    fp_log_set(c, &blk[f[F_B_STATE]], f[F_LIVE]);
    fp_log_set(c, &blk[f[F_B_OWNER]], -1);
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
    fp_log_set(c, head, next);
    if (next >= 0)
        fp_log_set(c, &c->bq[next * f[F_BLK_FIELDS] + f[F_B_PREV]], -1);
    fp_log_set(c, &blk[f[F_B_STATE]], f[F_WRITING]);
    fp_log_set(c, &blk[f[F_B_OWNER]], slot);
    int64_t used = seg[f[F_S_USED]] + 1;
    fp_log_set(c, &seg[f[F_S_USED]], used);
    if (used == 1)  /* the segment was idle: it leaves the reuse cache */
        fp_log_set(c, &h[f[F_H_IDLE]], h[f[F_H_IDLE]] - seg[f[F_S_SIZE]]);
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
    int begun = fp_begin_section(c, fd, epoch, &wseq);
    if (begun <= 0)
        return begun < 0 ? NULL : PyLong_FromLong(-1);
    int64_t b = take_locked(c, cls, slot);
    if (fp_end_section(c, fd, wseq) < 0)
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
    int begun = fp_begin_section(c, fd, epoch, &wseq);
    if (begun <= 0)
        return begun < 0 ? NULL : Py_NewRef(Py_False);
    int done = 0;
    /* fp_find gives the entry, not the slot: probe for the empty slot */
    if (fp_find(c, kbz, n, hash) == -1 && fp_guards_hold(c, args[10], args[11])) {
        int64_t i = hash & c->mask;
        while (LD(&c->ht[i]) != 0)
            i = (i + 1) & c->mask;
        done = publish_locked(c, i, slot, kbz, n, hash, b, nbytes, args[7], args[8], flags);
    }
    if (fp_end_section(c, fd, wseq) < 0)
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
    d->busy = fp_pinned(c, d->b);
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
    fp_log_set(c, &c->ht[i], 0);
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
            fp_log_set(c, &c->ht[i], v);
            fp_log_set(c, &c->ht[j], 0);
            i = j;
        }
    }
    fp_log_set(c, &h[f[F_H_NKEYS]], h[f[F_H_NKEYS]] - 1);
    int64_t *eq = (int64_t *)(c->eb + d->e * f[F_ENT_SIZE]);
    fp_log_set(c, &eq[f[F_E_NEXT]], h[f[F_H_ENT_FREE]]);
    fp_log_set(c, &h[f[F_H_ENT_FREE]], d->e);
    if (d->b < 0)
        return;
    int64_t *blk = c->bq + d->b * f[F_BLK_FIELDS];
    if (d->busy) {
        fp_log_set(c, &blk[f[F_B_STATE]], f[F_RETIRED]);
        return;
    }
    int64_t *head = &h[f[F_H_CLASS0] + blk[f[F_B_CLS]]];
    int64_t first = *head;
    fp_log_set(c, &blk[f[F_B_STATE]], f[F_FREE]);
    fp_log_set(c, &blk[f[F_B_OWNER]], -1);
    fp_log_set(c, &blk[f[F_B_PREV]], -1);
    fp_log_set(c, &blk[f[F_B_NEXT]], first);
    if (first >= 0)
        fp_log_set(c, &c->bq[first * f[F_BLK_FIELDS] + f[F_B_PREV]], d->b);
    fp_log_set(c, head, d->b);
    int64_t *seg = c->sq + d->s * f[F_SEG_FIELDS];
    int64_t used = seg[f[F_S_USED]] - 1;
    fp_log_set(c, &seg[f[F_S_USED]], used);
    if (used == 0) {  /* idle now: into the reuse cache, stamped for eviction order */
        fp_log_set(c, &h[f[F_H_IDLE]], h[f[F_H_IDLE]] + seg[f[F_S_SIZE]]);
        fp_log_set(c, &seg[f[F_S_STAMP]], h[f[F_H_SEQ]]);
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

FP_INTERNAL PyObject *
fp_remove_impl(Ctl *c, PyObject *const *args)
{
    if (!ctl_bound(c))
        return NULL;
    int fd = PyLong_AsLong(args[0]);
    int64_t epoch = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *kbz = args[3], *ckbz = args[5];
    int64_t hash, chash = 0;
    if (fd < 0 || !fp_parse_key(c, kbz, args[4], &hash)
            || (ckbz != NULL && !fp_parse_key(c, ckbz, args[6], &chash)))
        Py_RETURN_NONE;
    int64_t wseq;
    int begun = fp_begin_section(c, fd, epoch, &wseq);
    if (begun <= 0)
        return begun < 0 ? NULL : Py_NewRef(Py_None);
    int done = 0;  /* 1 removed, 2 absent, 0 declined, -1 left for a rollback */
    int64_t e = fp_find(c, PyBytes_AS_STRING(kbz), PyBytes_GET_SIZE(kbz), hash);
    int64_t ce = -1;
    if (e == -1) {
        done = 2;
    } else if (e >= 0 && ckbz != NULL) {
        ce = fp_find(c, PyBytes_AS_STRING(ckbz), PyBytes_GET_SIZE(ckbz), chash);
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
    if (fp_end_section(c, fd, wseq) < 0)
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
