/*
 * polystore._fastpath: the hot paths of SharedArrayStore in C.
 *
 * The pure-Python paths in _shm_read.py and _shm_write.py define the
 * semantics; this module repeats their common cases with far fewer memory
 * accesses and no bytecode:
 *
 *   Ctl.view(): a get() whose value description this process has cached:
 *       the lock-free lookup and pin of get_optimistic(), then the view;
 *   Ctl.get(): the same lookup and pin, for the Python path to make a view;
 *   Ctl.put_in_place(): a small put that overwrites a key's own block, the
 *       steady state of a value handed over again and again;
 *   Ctl.pin_add(): the one way this process changes its row of the pin
 *       table while the fast path is on (an atomic add), which is what lets
 *       the read path pin without the store's thread lock.
 *
 * Anything else (a new key, another shape, a block in use, a store closed or
 * shrunk meanwhile, a mapping this process has not made yet) is declined with
 * a return value, and the caller runs the Python path. Nothing here raises for
 * such cases, and nothing here allocates memory in the store.
 *
 * The table geometry and field numbers come from Python (_shm_index) when a
 * Ctl is made, so the layout is written down in one place only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>

/* Shared memory that other processes write without our lock: every read of
 * it is a single relaxed atomic load, so the compiler neither tears it nor
 * caches it across the seqlock check. */
#define LD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ST(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

enum {
    /* order of the `fields` tuple given to Ctl() */
    F_ENT_SIZE, F_E_BLOCK, F_E_NBYTES, F_E_SEQ, F_E_META, F_E_MSEQ, F_E_KEY,
    F_E_DTYPE, F_E_SHAPE, F_BLK_FIELDS, F_B_SEG, F_B_OFF, F_B_CLS,
    F_SEG_FIELDS, F_S_GEN, F_H_WSEQ, F_H_CLOSED, F_H_EPOCH, F_H_SEQ,
    F_H_PROC_HW, N_FIELDS
};

static PyObject *str_locked;  /* interned method name */
/* Tests only: called by get() between its pin and its check of the write
 * counter, the window in which a writer must send the reader to the lock. */
static PyObject *test_hook;

typedef struct {
    PyObject_HEAD
    Py_buffer buf;  /* the whole control segment; buf.obj NULL once released */
    int64_t *h, *ht, *bq, *sq;
    char *eb;
    int32_t *pins;
    int64_t mask, max_keys, max_blocks, max_segs, max_procs;
    int64_t f[N_FIELDS];
    int64_t class_sizes[256];  /* ix.CLASS_SIZES */
    int64_t n_classes;
    int64_t small_put;         /* _shm_write.SMALL_PUT */
    /* the arena's objects that never change (see bind()) */
    PyObject *meta, *ro_maps, *rw_maps, *refs, *view_dead;
} Ctl;

/* The store's index: slot and entry of a key (bytes plus NUL), as find() in
 * _shm_index.py. Entry -1: absent (slot is where it would go). Entry -2: the
 * table looked inconsistent, which only a read racing a writer can see. */
static int64_t
find(Ctl *c, const char *kbz, Py_ssize_t n, int64_t hash)
{
    int64_t i = hash & c->mask;
    for (int64_t probe = 0; probe <= c->mask; probe++) {
        int64_t v = LD(&c->ht[i]);
        if (v == 0)
            return -1;
        if (v > 0 && (v >> 32) == hash) {
            int64_t e = (v & 0xFFFFFFFF) - 1;
            if (e < 0 || e >= c->max_keys)
                return -2;
            if (memcmp(c->eb + e * c->f[F_ENT_SIZE] + c->f[F_E_KEY], kbz, n) == 0)
                return e;
        }
        i = (i + 1) & c->mask;
    }
    return -2;
}

static int
ctl_live(Ctl *c)
{
    if (c->buf.obj == NULL) {
        PyErr_SetString(PyExc_ValueError, "the control segment was released");
        return 0;
    }
    return 1;
}

static int
key_ok(Ctl *c, Py_ssize_t n)
{
    /* kbz is the key and its NUL: it must fit the key field of an entry */
    return n >= 2 && n <= c->f[F_E_DTYPE] - c->f[F_E_KEY];
}

/* *out = dict[key] (borrowed), for an int key: 1 found, 0 absent, -1 error. */
static int
item_of(PyObject *dict, int64_t key, PyObject **out)
{
    PyObject *k = PyLong_FromLongLong(key);
    if (k == NULL)
        return -1;
    *out = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    if (*out == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return 1;
}

/* *mm = this process's mapping of segment s (from ro_maps or rw_maps, whose
 * items are (generation, mmap)), borrowed: 1 if mapped at generation gen,
 * 0 if not, -1 on error. */
static int
mapping_at(PyObject *maps, int64_t s, int64_t gen, PyObject **mm)
{
    PyObject *item;
    int found = item_of(maps, s, &item);
    if (found <= 0)
        return found;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    long long mapped_gen = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
    if (mapped_gen == -1 && PyErr_Occurred())
        return -1;
    *mm = PyTuple_GET_ITEM(item, 1);
    return mapped_gen == gen;
}

/* -- get ------------------------------------------------------------------ */

/* Add delta to one count of this process's row of the pin table. Only this
 * process writes its row, and with the fast path on every change it makes to
 * it is one call of this (or of Ctl.pin_add from Python) while holding the
 * GIL, hence no read-modify-write of another thread can come in between. The
 * add is locked, which is also the full barrier a reader needs between its
 * pin and its check of the write counter. A count never goes below zero. */
static void
pin_atomic(int32_t *pin, int32_t delta)
{
    if (delta >= 0) {
        __atomic_fetch_add(pin, delta, __ATOMIC_SEQ_CST);
        return;
    }
    int32_t old = LD(pin);
    while (old > 0) {
        int32_t now = old + delta > 0 ? old + delta : 0;
        if (__atomic_compare_exchange_n(pin, &old, now, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            return;
    }
}

typedef struct {
    PyObject *meta;  /* a reference of its own: other threads may change the dict */
    int64_t b, s, gen, off;
    int32_t *pin;    /* NULL for a value without a block */
} Found;

enum { GOT = 1, ABSENT = 0, DECLINED = -1, FAILED = -2 };

/* The seqlock read of get_optimistic() in _shm_read.py: look the key up and pin
 * its block, for a value whose description meta[entry] this process cached. */
static int
lookup_and_pin(Ctl *c, PyObject *const *args, Found *out)
{
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "kbz must be bytes");
        return FAILED;
    }
    if (!ctl_live(c))
        return FAILED;
    if (c->meta == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ctl.bind() was not called");
        return FAILED;
    }
    const char *kbz = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    int64_t hash = PyLong_AsLongLong(args[1]);
    int64_t epoch = PyLong_AsLongLong(args[2]);
    int64_t pin_base = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return FAILED;
    if (!key_ok(c, n) || pin_base < 0 || pin_base % c->max_blocks
            || pin_base >= c->max_procs * c->max_blocks)
        return DECLINED;

    const int64_t *f = c->f;
    int64_t *h = c->h;
    int64_t seq = LD(&h[f[F_H_WSEQ]]);
    if ((seq & 1) || LD(&h[f[F_H_CLOSED]]) || LD(&h[f[F_H_EPOCH]]) != epoch)
        return DECLINED;
    int64_t e = find(c, kbz, n, hash);
    if (e == -2)
        return DECLINED;
    if (e == -1) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        return LD(&h[f[F_H_WSEQ]]) == seq ? ABSENT : DECLINED;
    }
    const int64_t *eq = (const int64_t *)(c->eb + e * f[F_ENT_SIZE]);
    int64_t b = LD(&eq[f[F_E_BLOCK]]);
    int64_t mseq = LD(&eq[f[F_E_MSEQ]]);

    PyObject *meta;
    int cached_meta = item_of(c->meta, e, &meta);
    if (cached_meta <= 0)
        return cached_meta < 0 ? FAILED : DECLINED;
    if (!PyTuple_Check(meta) || PyTuple_GET_SIZE(meta) != 7)
        return DECLINED;
    int64_t cached = PyLong_AsLongLong(PyTuple_GET_ITEM(meta, 0));
    if (cached == -1 && PyErr_Occurred())
        return FAILED;
    if (cached != mseq)
        return DECLINED;

    out->b = b;
    out->s = out->gen = out->off = 0;
    out->pin = NULL;
    if (b >= 0) {
        if (b >= c->max_blocks)
            return DECLINED;
        const int64_t *blk = c->bq + b * f[F_BLK_FIELDS];
        out->s = LD(&blk[f[F_B_SEG]]);
        out->off = LD(&blk[f[F_B_OFF]]);
        if (out->s < 0 || out->s >= c->max_segs || out->off < 0)
            return DECLINED;
        out->gen = LD(&c->sq[out->s * f[F_SEG_FIELDS] + f[F_S_GEN]]);
        out->pin = &c->pins[pin_base + b];
        pin_atomic(out->pin, 1);
    } else {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    if (test_hook != NULL) {
        PyObject *r = PyObject_CallNoArgs(test_hook);
        if (r == NULL)
            PyErr_WriteUnraisable(test_hook);
        Py_XDECREF(r);
        if (c->buf.obj == NULL)  /* the hook ran Python code: shut down meanwhile? */
            return DECLINED;  /* (the row went with the store, pin and all) */
    }
    if (LD(&h[f[F_H_WSEQ]]) != seq) {
        if (out->pin != NULL)
            pin_atomic(out->pin, -1);
        return DECLINED;
    }
    out->meta = Py_NewRef(meta);
    return GOT;
}

PyDoc_STRVAR(ctl_get_doc,
"get(arena, kbz, hash) -> tuple | None | False\n\n"
"Look a key up and pin its block without the store lock (a seqlock read).\n"
"Returns (meta, block, segment, generation, offset) with the block pinned in\n"
"this process's row of the pin table; None if the key is absent; False when\n"
"the Python path must decide (a writer was busy or got in the way, the store\n"
"changed, or arena.meta[entry] is not the cached description of the value).\n"
"arena is the store's polystore._shm_arena.Arena in this process.");

/* What get() and view() return when lookup_and_pin() did not pin a value. */
static PyObject *
not_got(int status)
{
    if (status == ABSENT)
        Py_RETURN_NONE;
    if (status == DECLINED)
        Py_RETURN_FALSE;
    return NULL;  /* FAILED, with the exception set */
}

/* Drop a pin that nothing will track, unless the store was shut down in this
 * process meanwhile (its row went with it). */
static void
drop_pin(Ctl *c, int32_t *pin)
{
    if (c->buf.obj != NULL)
        pin_atomic(pin, -1);
}

static PyObject *
get_impl(Ctl *c, PyObject *const *args)
{
    Found found;
    int status = lookup_and_pin(c, args, &found);
    if (status != GOT)
        return not_got(status);
    PyObject *r = Py_BuildValue("(OLLLL)", found.meta, (long long)found.b,
                                (long long)found.s, (long long)found.gen, (long long)found.off);
    Py_DECREF(found.meta);
    if (r == NULL && found.pin != NULL)  /* out of memory: nothing will unpin it */
        drop_pin(c, found.pin);
    return r;
}


/* The view of a pinned block, as view_of() in _shm_read.py makes it. Once
 * *tracked is set, the weak reference unpins the block when the view's base
 * dies, so a failure after that (in reshape) leaves the pin to it. */
static PyObject *
make_view(Found *found, PyObject *ro_maps, PyObject *refs, PyObject *callback, int *tracked)
{
    PyObject *meta = found->meta, *mm;
    int mapped = mapping_at(ro_maps, found->s, found->gen, &mm);
    if (mapped <= 0)  /* not mapped at this generation yet: Python maps it */
        return mapped < 0 ? NULL : Py_NewRef(Py_False);

    /* meta: (mseq, dtype, shape, count, order, flags, dt) */
    PyObject *dtype = PyTuple_GET_ITEM(meta, 1), *shape = PyTuple_GET_ITEM(meta, 2);
    if (!PyArray_DescrCheck(dtype) || !PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) > NPY_MAXDIMS)
        return Py_NewRef(Py_False);
    int nd = (int)PyTuple_GET_SIZE(shape);
    npy_intp dims[NPY_MAXDIMS];
    for (int j = 0; j < nd; j++) {
        dims[j] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, j));
        if (dims[j] < 0)
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    }
    int fortran = PyUnicode_Check(PyTuple_GET_ITEM(meta, 4))
                  && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(meta, 4), "F") == 0;

    /* The view's base: a memoryview of its own over the mapping, which keeps
     * the mapping alive and which every view derived from this one keeps
     * alive in turn; when it dies, no view of the block is left in this
     * process (Arena.track). Objects are made from here on, so garbage
     * collection may run Python code, even code that drops the mapping from
     * ro_maps: it is held here until the memoryview holds it. */
    Py_INCREF(mm);
    PyObject *base = PyMemoryView_FromObject(mm);
    Py_DECREF(mm);
    if (base == NULL)
        return NULL;
    Py_buffer *mapped_buf = PyMemoryView_GET_BUFFER(base);
    npy_intp nbytes = PyDataType_ELSIZE((PyArray_Descr *)dtype);
    for (int j = 0; j < nd; j++)
        nbytes *= dims[j];
    if (found->off + nbytes > mapped_buf->len) {  /* not this block: leave it to Python */
        Py_DECREF(base);
        return Py_NewRef(Py_False);
    }
    char *data = (char *)mapped_buf->buf + found->off;
    PyObject *ref = PyWeakref_NewRef(base, callback);
    PyObject *id = ref == NULL ? NULL : PyLong_FromVoidPtr(ref);
    PyObject *entry = id == NULL ? NULL : Py_BuildValue("(OL)", ref, (long long)found->b);
    int stored = entry == NULL ? -1 : PyDict_SetItem(refs, id, entry);
    Py_XDECREF(entry);
    Py_XDECREF(id);
    Py_XDECREF(ref);
    if (stored < 0) {
        Py_DECREF(base);
        return NULL;
    }
    *tracked = 1;  /* from here, the base's death unpins */
    Py_INCREF(dtype);  /* PyArray_NewFromDescr takes this reference */
    PyObject *view = PyArray_NewFromDescr(&PyArray_Type, (PyArray_Descr *)dtype, nd, dims, NULL,
                                          data, fortran ? NPY_ARRAY_F_CONTIGUOUS : 0, NULL);
    if (view == NULL) {
        Py_DECREF(base);
        return NULL;
    }
    PyArray_CLEARFLAGS((PyArrayObject *)view, NPY_ARRAY_WRITEABLE);
    if (PyArray_SetBaseObject((PyArrayObject *)view, base) < 0) {  /* takes base */
        Py_DECREF(view);
        return NULL;
    }
    return view;
}

PyDoc_STRVAR(ctl_view_doc,
"view(arena, key) -> ndarray | None | False\n\n"
"get() of a key found in the key cache, then the read-only view of the pinned\n"
"block, tracked as Arena.track() does (unpinned once no view is left). None\n"
"if the key is absent; False, with nothing pinned, when the Python path must\n"
"decide (as for get(), and for a key not in the cache, a process without a\n"
"row in the pin table, an empty value, or a segment not mapped for reading\n"
"at its current generation).");

static PyObject *
view_impl(Ctl *c, PyObject *const *args)
{
    Found found;
    int status = lookup_and_pin(c, args, &found);
    if (status != GOT)
        return not_got(status);
    if (found.pin == NULL) {  /* an empty value: a new array, made in Python */
        Py_DECREF(found.meta);
        Py_RETURN_FALSE;
    }
    /* Making the view makes objects, so the garbage collector may run Python
     * code meanwhile, even code that shuts the store down in this process:
     * what make_view() uses gets references of its own first. */
    PyObject *ro_maps = c->ro_maps, *refs = c->refs, *callback = c->view_dead;
    Py_INCREF(ro_maps);
    Py_INCREF(refs);
    Py_INCREF(callback);
    int tracked = 0;
    PyObject *view = make_view(&found, ro_maps, refs, callback, &tracked);
    Py_DECREF(found.meta);
    Py_DECREF(ro_maps);
    Py_DECREF(refs);
    Py_DECREF(callback);
    if (!tracked && (view == NULL || view == Py_False))
        drop_pin(c, found.pin);
    return view;
}

/* -- put in place --------------------------------------------------------- */

/* Whether entry e holds a plain array (no flags) of exactly src's dtype and
 * shape: its description cached in meta[e] is current (E_MSEQ), names the
 * very dtype object of src, and has src's shape; the entry agrees. */
static int
same_description(Ctl *c, int64_t e, const int64_t *eq, Py_buffer *src, PyObject *dtype,
                 PyObject *meta_dict)
{
    const int64_t *f = c->f;
    PyObject *meta;
    int cached = item_of(meta_dict, e, &meta);
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
    int mapped = mapping_at(rw_maps, s, gen, &mm);
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

PyDoc_STRVAR(ctl_put_doc,
"put_in_place(arena, key, array) -> bool\n\n"
"Take the store lock (flock on arena._fd, without waiting) and copy a\n"
"C-contiguous array over the block of a key in the key cache when the Python\n"
"path would do exactly that: the key's current description, cached in\n"
"arena.meta, has the array's dtype and shape; the block has the array's size\n"
"class; no process holds a view of it; and its segment is mapped writable at\n"
"its current generation. Returns False, having changed nothing, in every\n"
"other case: for arrays of over small_put bytes or empty ones, while another\n"
"thread of this process is in the store, and while another process holds\n"
"the lock.");

static PyObject *str_dtype;

static PyObject *
put_impl(Ctl *c, PyObject *const *args)
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
    PyObject *dtype = PyObject_GetAttr(args[4], str_dtype);
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
        int64_t e = find(c, kbz, n, hash);
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


/* -- entry points: the arena's state read in C ------------------------------ */

static PyObject *s_epoch, *s_pin_base, *s_lock, *s_fd, *s_pending, *s_slot;

/* Fetch n attributes of the arena into out (new references); 0, or -1 with
 * an exception and nothing held. */
static int
fetch(PyObject *arena, PyObject **names, PyObject **out, int n)
{
    for (int i = 0; i < n; i++) {
        out[i] = PyObject_GetAttr(arena, names[i]);
        if (out[i] == NULL) {
            while (--i >= 0)
                Py_DECREF(out[i]);
            return -1;
        }
    }
    return 0;
}

static void
drop(PyObject **refs, int n)
{
    for (int i = 0; i < n; i++)
        Py_DECREF(refs[i]);
}

/* shmstore's cache of valid keys: str -> (bytes, bytes + NUL, hash) */
static PyObject *key_cache;

/* The cached parts of a key (a new reference); NULL, without an error, for a
 * key that is not a str or not in the cache (the Python path validates it). */
static PyObject *
cached_key(PyObject *key)
{
    if (key_cache == NULL || !PyUnicode_CheckExact(key))
        return NULL;
    PyObject *parts = PyDict_GetItemWithError(key_cache, key);  /* borrowed */
    if (parts == NULL || !PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 3
            || !PyBytes_Check(PyTuple_GET_ITEM(parts, 1)))
        return NULL;
    return Py_NewRef(parts);
}

static int
check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *name, const char *what)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %s", name, what);
        return -1;
    }
    return 0;
}

/* impl(kbz, hash, epoch, pin_base) with the arena's current epoch and row
 * of the pin table (False while it has none: the Python path takes one). */
static PyObject *
with_row(Ctl *c, PyObject *arena, PyObject *kbz, PyObject *hash,
         PyObject *(*impl)(Ctl *, PyObject *const *))
{
    PyObject *names[3] = {s_slot, s_epoch, s_pin_base};
    PyObject *got[3];
    if (fetch(arena, names, got, 3) < 0)
        return NULL;
    PyObject *r;
    long slot = PyLong_AsLong(got[0]);
    if (slot < 0) {
        r = PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    } else {
        PyObject *inner[4] = {kbz, hash, got[1], got[2]};
        r = impl(c, inner);
    }
    drop(got, 3);
    return r;
}

static PyObject *
ctl_get(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 3, "get", "the arena, the key's bytes and NUL, and its hash") < 0)
        return NULL;
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "get(): the key must be bytes");
        return NULL;
    }
    return with_row(c, args[0], args[1], args[2], get_impl);
}

static PyObject *
ctl_view(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 2, "view", "the arena and the key") < 0)
        return NULL;
    PyObject *parts = cached_key(args[1]);
    if (parts == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    PyObject *r = with_row(c, args[0], PyTuple_GET_ITEM(parts, 1), PyTuple_GET_ITEM(parts, 2),
                           view_impl);
    Py_DECREF(parts);
    return r;
}

static PyObject *
ctl_put_in_place(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 3, "put_in_place", "the arena, the key and the array") < 0)
        return NULL;
    PyObject *arena = args[0];
    PyObject *parts = cached_key(args[1]);
    if (parts == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    PyObject *names[4] = {s_fd, s_epoch, s_lock, s_pending};
    PyObject *got[4];
    if (fetch(arena, names, got, 4) < 0) {
        Py_DECREF(parts);
        return NULL;
    }
    PyObject *lock = got[2], *pending = got[3];
    PyObject *r = NULL;
    /* A thread of ours in the store (it holds the thread lock, perhaps while
     * it waits for the flock), or unpins waiting: the Python path. */
    if (!PyList_Check(pending) || PyList_GET_SIZE(pending) > 0) {
        r = Py_NewRef(Py_False);
        goto done;
    }
    PyObject *held = PyObject_CallMethodNoArgs(lock, str_locked);
    if (held == NULL)
        goto done;
    int busy = held != Py_False;
    Py_DECREF(held);
    if (busy) {
        r = Py_NewRef(Py_False);
        goto done;
    }
    PyObject *inner[5] = {got[0], PyTuple_GET_ITEM(parts, 1), PyTuple_GET_ITEM(parts, 2), got[1],
                          args[2]};
    r = put_impl(c, inner);
done:
    drop(got, 4);
    Py_DECREF(parts);
    return r;
}

/* -- the type and the module ------------------------------------------------- */

static int
ctl_clear(Ctl *c)
{
    Py_CLEAR(c->meta);
    Py_CLEAR(c->ro_maps);
    Py_CLEAR(c->rw_maps);
    Py_CLEAR(c->refs);
    Py_CLEAR(c->view_dead);
    return 0;
}

static int
ctl_traverse(Ctl *c, visitproc visit, void *arg)
{
    Py_VISIT(c->meta);
    Py_VISIT(c->ro_maps);
    Py_VISIT(c->rw_maps);
    Py_VISIT(c->refs);
    Py_VISIT(c->view_dead);
    return 0;
}

static PyObject *
ctl_bind(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])
            || !PyDict_Check(args[2]) || !PyDict_Check(args[3]) || !PyCallable_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "bind(meta: dict, ro_maps: dict, rw_maps: dict, refs: dict, view_dead)");
        return NULL;
    }
    Py_XSETREF(c->meta, Py_NewRef(args[0]));
    Py_XSETREF(c->ro_maps, Py_NewRef(args[1]));
    Py_XSETREF(c->rw_maps, Py_NewRef(args[2]));
    Py_XSETREF(c->refs, Py_NewRef(args[3]));
    Py_XSETREF(c->view_dead, Py_NewRef(args[4]));
    Py_RETURN_NONE;
}

static PyObject *
ctl_pin_add(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pin_add(index, delta)");
        return NULL;
    }
    if (!ctl_live(c))
        return NULL;
    long long index = PyLong_AsLongLong(args[0]);
    long delta = PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= c->max_procs * c->max_blocks || delta < INT32_MIN
            || delta > INT32_MAX) {
        PyErr_Format(PyExc_IndexError, "pin_add(%lld, %ld): no such count", index, delta);
        return NULL;
    }
    pin_atomic(&c->pins[index], (int32_t)delta);
    Py_RETURN_NONE;
}

static PyObject *
ctl_release(Ctl *c, PyObject *Py_UNUSED(ignored))
{
    ctl_clear(c);
    if (c->buf.obj != NULL)
        PyBuffer_Release(&c->buf);
    c->h = c->ht = c->bq = c->sq = NULL;
    c->eb = NULL;
    c->pins = NULL;
    Py_RETURN_NONE;
}

static int
ctl_init(Ctl *c, PyObject *args, PyObject *kwds)
{
    PyObject *buffer, *offsets, *geometry, *fields, *classes;
    long long small_put;
    static char *kwlist[] = {
        "buffer", "offsets", "geometry", "fields", "class_sizes", "small_put", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O!O!O!L:Ctl", kwlist, &buffer,
            &PyTuple_Type, &offsets, &PyTuple_Type, &geometry, &PyTuple_Type, &fields,
            &PyTuple_Type, &classes, &small_put))
        return -1;
    Py_ssize_t n_classes = PyTuple_GET_SIZE(classes);
    if (n_classes < 1 || n_classes > 256 || small_put < 0) {
        PyErr_SetString(PyExc_ValueError, "Ctl() takes 1 to 256 size classes, small_put >= 0");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n_classes; i++) {
        c->class_sizes[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(classes, i));
        if (i > 0 && c->class_sizes[i] <= c->class_sizes[i - 1] && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "Ctl(): size classes must increase");
            return -1;
        }
    }
    c->n_classes = n_classes;
    c->small_put = small_put;
    if (PyTuple_GET_SIZE(offsets) != 6 || PyTuple_GET_SIZE(geometry) != 5
            || PyTuple_GET_SIZE(fields) != N_FIELDS) {
        PyErr_Format(PyExc_ValueError,
            "Ctl() takes 6 offsets, 5 geometry values and %d field numbers", N_FIELDS);
        return -1;
    }
    int64_t off[6], geo[5];
    for (int i = 0; i < 6; i++)
        off[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(offsets, i));
    for (int i = 0; i < 5; i++)
        geo[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(geometry, i));
    for (int i = 0; i < N_FIELDS; i++)
        c->f[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(fields, i));
    if (PyErr_Occurred())
        return -1;
    ctl_release(c, NULL);
    if (PyObject_GetBuffer(buffer, &c->buf, PyBUF_WRITABLE) < 0)
        return -1;
    /* Every table must lie inside its section and the buffer, and every field
     * inside its record: a wrong layout is refused here, not found out later
     * by writing out of bounds. Sections: header, ht, ent, blk, seg, pins. */
    const int64_t *f = c->f;
    int ok = 1;
    for (int i = 0; i < 5; i++)
        ok &= geo[i] > 0 && geo[i] < ((int64_t)1 << 32);
    for (int i = 0; i < N_FIELDS; i++)
        ok &= f[i] >= 0 && f[i] < 4096;
    int64_t header_slots = 0;
    for (int i = F_H_WSEQ; i <= F_H_PROC_HW; i++)
        header_slots = f[i] + 1 > header_slots ? f[i] + 1 : header_slots;
    int64_t longest_entry_field = 0;
    for (int i = F_E_BLOCK; i <= F_E_MSEQ; i++)
        longest_entry_field = f[i] > longest_entry_field ? f[i] : longest_entry_field;
    ok &= ((geo[0] + 1) & geo[0]) == 0;  /* mask + 1: a power of two */
    ok &= f[F_ENT_SIZE] % 8 == 0 && f[F_E_SHAPE] % 8 == 0 && f[F_E_SHAPE] < f[F_ENT_SIZE];
    ok &= (longest_entry_field + 1) * 8 <= f[F_E_KEY] && f[F_E_KEY] < f[F_E_DTYPE]
          && f[F_E_DTYPE] < f[F_E_SHAPE];
    ok &= f[F_B_SEG] < f[F_BLK_FIELDS] && f[F_B_OFF] < f[F_BLK_FIELDS]
          && f[F_B_CLS] < f[F_BLK_FIELDS] && f[F_S_GEN] < f[F_SEG_FIELDS];
    if (ok) {
        int64_t need[6] = {
            header_slots * 8, (geo[0] + 1) * 8, geo[1] * f[F_ENT_SIZE],
            geo[2] * f[F_BLK_FIELDS] * 8, geo[3] * f[F_SEG_FIELDS] * 8, geo[4] * geo[2] * 4,
        };
        for (int i = 0; i < 6; i++) {
            int64_t end = i < 5 ? off[i + 1] : (int64_t)c->buf.len;
            ok &= off[i] >= 0 && off[i] % 8 == 0 && off[i] + need[i] <= end;
        }
    }
    if (!ok) {
        PyBuffer_Release(&c->buf);
        PyErr_SetString(PyExc_ValueError, "Ctl(): the layout does not fit the buffer");
        return -1;
    }
    char *base = (char *)c->buf.buf;
    c->h = (int64_t *)(base + off[0]);
    c->ht = (int64_t *)(base + off[1]);
    c->eb = base + off[2];
    c->bq = (int64_t *)(base + off[3]);
    c->sq = (int64_t *)(base + off[4]);
    c->pins = (int32_t *)(base + off[5]);
    c->mask = geo[0];
    c->max_keys = geo[1];
    c->max_blocks = geo[2];
    c->max_segs = geo[3];
    c->max_procs = geo[4];
    return 0;
}

static void
ctl_dealloc(Ctl *c)
{
    PyObject_GC_UnTrack(c);
    ctl_release(c, NULL);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *
set_key_cache(PyObject *Py_UNUSED(module), PyObject *cache)
{
    if (!PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "the key cache must be a dict");
        return NULL;
    }
    Py_XSETREF(key_cache, Py_NewRef(cache));
    Py_RETURN_NONE;
}

static PyObject *
set_test_hook(PyObject *Py_UNUSED(module), PyObject *hook)
{
    Py_XSETREF(test_hook, hook == Py_None ? NULL : Py_NewRef(hook));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_key_cache", set_key_cache, METH_O,
     "The dict of valid keys that view() and put_in_place() look keys up in: "
     "str -> (bytes, bytes + NUL, hash), as polystore.shmstore keeps it."},
    {"_set_test_hook", set_test_hook, METH_O,
     "Tests only: call hook() inside every get(), between the pin and the check "
     "(None removes it)."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef ctl_methods[] = {
    {"get", (PyCFunction)(void (*)(void))ctl_get, METH_FASTCALL, ctl_get_doc},
    {"view", (PyCFunction)(void (*)(void))ctl_view, METH_FASTCALL, ctl_view_doc},
    {"put_in_place", (PyCFunction)(void (*)(void))ctl_put_in_place, METH_FASTCALL, ctl_put_doc},
    {"bind", (PyCFunction)(void (*)(void))ctl_bind, METH_FASTCALL,
     "bind(meta, ro_maps, rw_maps, refs, view_dead): the arena's objects that never "
     "change, which get(), view() and put_in_place() use."},
    {"pin_add", (PyCFunction)(void (*)(void))ctl_pin_add, METH_FASTCALL,
     "pin_add(index, delta): change a count of this process's row of the pin table "
     "atomically (never below zero). With the fast path on, every change to the row goes "
     "through here, so that the lock-free get() needs no thread lock."},
    {"release", (PyCFunction)ctl_release, METH_NOARGS,
     "Give the control segment's buffer back (every later call raises ValueError)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CtlType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "polystore._fastpath.Ctl",
    .tp_basicsize = sizeof(Ctl),
    .tp_dealloc = (destructor)ctl_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)ctl_traverse,
    .tp_clear = (inquiry)ctl_clear,
    .tp_doc = "Ctl(buffer, offsets, geometry, fields): one store's control segment, "
              "as the C fast paths see it.",
    .tp_methods = ctl_methods,
    .tp_init = (initproc)ctl_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "polystore._fastpath",
    .m_doc = "The hot paths of SharedArrayStore in C (optional; see polystore._shm_fast).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&CtlType) < 0)
        return NULL;
    str_locked = PyUnicode_InternFromString("locked");
    s_epoch = PyUnicode_InternFromString("_epoch");
    s_pin_base = PyUnicode_InternFromString("pin_base");
    s_lock = PyUnicode_InternFromString("_lock");
    s_fd = PyUnicode_InternFromString("_fd");
    s_pending = PyUnicode_InternFromString("_pending");
    s_slot = PyUnicode_InternFromString("slot");
    if (!s_epoch || !s_pin_base || !s_lock || !s_fd || !s_pending || !s_slot)
        return NULL;
    str_dtype = PyUnicode_InternFromString("dtype");
    if (str_locked == NULL || str_dtype == NULL)
        return NULL;
    if (_import_array() < 0)  /* numpy's C API, checked against the numpy that runs */
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CtlType);
    if (PyModule_AddObject(m, "Ctl", (PyObject *)&CtlType) < 0) {
        Py_DECREF(&CtlType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
