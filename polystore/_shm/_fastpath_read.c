/*
 * polystore._shm._fastpath: the read path, a get() without the store lock.
 *
 * A seqlock read of the shared index (see read.py, which it repeats):
 * note the write counter, look the key up, pin the block in this process's
 * row of the pin table, check the counter; then build the view with numpy's
 * C API over a memoryview of the mapping, which Arena.track() watches.
 */
#define NO_IMPORT_ARRAY
#include "_fastpath.h"

/* The store's index: slot and entry of a key (bytes plus NUL), as find() in
 * layout.py. Entry -1: absent (slot is where it would go). Entry -2: the
 * table looked inconsistent, which only a read racing a writer can see. */
FP_INTERNAL int64_t
fp_find(Ctl *c, const char *kbz, Py_ssize_t n, int64_t hash)
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

/* *out = dict[key] (borrowed), for an int key: 1 found, 0 absent, -1 error. */
FP_INTERNAL int
fp_item_of(PyObject *dict, int64_t key, PyObject **out)
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
FP_INTERNAL int
fp_mapping_at(PyObject *maps, int64_t s, int64_t gen, PyObject **mm)
{
    PyObject *item;
    int found = fp_item_of(maps, s, &item);
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

/* The description of entry e's value, as read_meta() in read.py makes it:
 * (mseq, dtype, shape, count, order, flags, dtype text), a new reference.
 * Read without the lock, so it may be torn: the caller uses it only once the
 * seqlock check passed. NULL without an exception: leave it to Python (a
 * dtype text no process decoded yet, or fields out of range). */
static PyObject *
decode_meta(Ctl *c, int64_t e, const int64_t *eq, int64_t mseq)
{
    const int64_t *f = c->f;
    /* E_META (layout.py): key length | ndim << 16 | flags << 24 | dtype length << 32 */
    int64_t word = LD(&eq[f[F_E_META]]);
    int ndim = (int)((word >> 16) & 0xFF), flags = (int)((word >> 24) & 0xFF);
    Py_ssize_t dlen = (Py_ssize_t)((word >> 32) & 0xFFFF);
    if (ndim > NPY_MAXDIMS || ndim > (f[F_ENT_SIZE] - f[F_E_SHAPE]) / 8 || dlen < 1
            || dlen > f[F_E_SHAPE] - f[F_E_DTYPE])
        return NULL;
    char text[512];
    if (dlen > (Py_ssize_t)sizeof(text))
        return NULL;
    const char *src = c->eb + e * f[F_ENT_SIZE] + f[F_E_DTYPE];
    for (Py_ssize_t j = 0; j < dlen; j++)
        text[j] = LD(&src[j]);
    PyObject *dt = PyBytes_FromStringAndSize(text, dlen);
    if (dt == NULL)
        return NULL;
    PyObject *dtype = PyDict_GetItemWithError(c->dtypes, dt);  /* borrowed */
    if (dtype == NULL) {
        Py_DECREF(dt);
        return NULL;
    }
    PyObject *shape = PyTuple_New(ndim);
    if (shape == NULL) {
        Py_DECREF(dt);
        return NULL;
    }
    int64_t count = 1;
    const int64_t *extents = eq + f[F_E_SHAPE] / 8;
    for (int j = 0; j < ndim; j++) {
        int64_t extent = LD(&extents[j]);
        PyObject *item = extent < 0 || __builtin_mul_overflow(count, extent, &count)
                         ? NULL : PyLong_FromLongLong(extent);
        if (item == NULL) {
            Py_DECREF(shape);
            Py_DECREF(dt);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, j, item);
    }
    PyObject *order = flags & f[F_F_FORTRAN] ? fp_str_F : fp_str_C;
    PyObject *meta = Py_BuildValue("(LONLOiN)", (long long)mseq, dtype, shape,
                                   (long long)count, order, flags, dt);
    return meta;
}

/* The seqlock read of get_optimistic() in read.py: look the key up and pin
 * its block, for a value whose description meta[entry] this process cached. */
static int
lookup_and_pin(Ctl *c, PyObject *const *args, Found *out)
{
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "kbz must be bytes");
        return FAILED;
    }
    if (!ctl_bound(c))
        return FAILED;
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
    int64_t e = fp_find(c, kbz, n, hash);
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
    int cached_meta = fp_item_of(c->meta, e, &meta);
    if (cached_meta < 0)
        return FAILED;
    int usable = cached_meta && PyTuple_Check(meta) && PyTuple_GET_SIZE(meta) == 7;
    if (usable) {
        int64_t cached = PyLong_AsLongLong(PyTuple_GET_ITEM(meta, 0));
        if (cached == -1 && PyErr_Occurred())
            return FAILED;
        usable = cached == mseq;
    }
    /* A reference of its own: the test hook below runs Python code, which
     * may replace the dict's item. Every return from here drops it but GOT. */
    int fresh = !usable;
    if (fresh) {  /* a value this process has not seen yet (a new key, say) */
        out->meta = decode_meta(c, e, eq, mseq);
        if (out->meta == NULL)
            return PyErr_Occurred() ? FAILED : DECLINED;
    } else {
        out->meta = Py_NewRef(meta);
    }
    out->b = b;
    out->s = out->gen = out->off = 0;
    out->pin = NULL;
    if (b >= 0) {
        if (b >= c->max_blocks)
            goto declined;
        const int64_t *blk = c->bq + b * f[F_BLK_FIELDS];
        out->s = LD(&blk[f[F_B_SEG]]);
        out->off = LD(&blk[f[F_B_OFF]]);
        if (out->s < 0 || out->s >= c->max_segs || out->off < 0)
            goto declined;
        out->gen = LD(&c->sq[out->s * f[F_SEG_FIELDS] + f[F_S_GEN]]);
        out->pin = &c->pins[pin_base + b];
        pin_atomic(out->pin, 1);
    } else {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    if (fp_test_hook != NULL) {
        PyObject *r = PyObject_CallNoArgs(fp_test_hook);
        if (r == NULL)
            PyErr_WriteUnraisable(fp_test_hook);
        Py_XDECREF(r);
        if (c->buf.obj == NULL)  /* the hook ran Python code: shut down meanwhile? */
            goto declined;  /* (the row went with the store, pin and all) */
    }
    if (LD(&h[f[F_H_WSEQ]]) != seq) {
        if (out->pin != NULL)
            pin_atomic(out->pin, -1);
        goto declined;
    }
    if (fresh) {  /* untorn: cache it, as read.get_optimistic() does (optional) */
        PyObject *k = PyLong_FromLongLong(e);
        if (k == NULL || PyDict_SetItem(c->meta, k, out->meta) < 0)
            PyErr_Clear();
        Py_XDECREF(k);
    }
    return GOT;
declined:
    Py_DECREF(out->meta);
    return DECLINED;
}

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

/* Watch base, which every view of block b keeps alive: refs[id(ref)] = (ref, b)
 * for a weak reference to base whose callback unpins b when base dies, as
 * Arena.track() does. 0, or -1 with an exception set (nothing watched). */
FP_INTERNAL int
fp_watch(PyObject *refs, PyObject *callback, PyObject *base, int64_t b)
{
    PyObject *ref = PyWeakref_NewRef(base, callback);
    PyObject *id = ref == NULL ? NULL : PyLong_FromVoidPtr(ref);
    PyObject *entry = id == NULL ? NULL : Py_BuildValue("(OL)", ref, (long long)b);
    int stored = entry == NULL ? -1 : PyDict_SetItem(refs, id, entry);
    Py_XDECREF(entry);
    Py_XDECREF(id);
    Py_XDECREF(ref);
    return stored;
}

/* The view of a pinned block, as get_optimistic() in read.py makes it. Once
 * *tracked is set, the weak reference unpins the block when the view's base
 * dies, so a failure after that (making the array) leaves the pin to it. */
static PyObject *
make_view(Found *found, PyObject *ro_maps, PyObject *refs, PyObject *callback, int *tracked)
{
    PyObject *meta = found->meta, *mm;
    int mapped = fp_mapping_at(ro_maps, found->s, found->gen, &mm);
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
    if (fp_watch(refs, callback, base, found->b) < 0) {
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

/* The view of a key's value, pinned and tracked in this one C call (so that
 * no signal handler can raise between the pin and the watch); with_flags:
 * (view, the value's flags) instead. */
static PyObject *
view_impl(Ctl *c, PyObject *const *args, int with_flags)
{
    Found found;
    int status = lookup_and_pin(c, args, &found);
    if (status == GOT && found.pin == NULL) {  /* an empty value: Python makes a new array */
        Py_DECREF(found.meta);
        status = DECLINED;
    }
    if (status != GOT)
        return not_got(status);
    /* Making the view makes objects, so the garbage collector may run Python
     * code meanwhile, even code that shuts the store down in this process:
     * what make_view() uses gets references of its own first. */
    PyObject *ro_maps = c->ro_maps, *refs = c->refs, *callback = c->view_dead;
    Py_INCREF(ro_maps);
    Py_INCREF(refs);
    Py_INCREF(callback);
    int tracked = 0;
    PyObject *view = make_view(&found, ro_maps, refs, callback, &tracked);
    if (with_flags && view != NULL && view != Py_False)  /* meta: (..., flags, dt) */
        Py_SETREF(view, PyTuple_Pack(2, view, PyTuple_GET_ITEM(found.meta, 5)));
    Py_DECREF(found.meta);
    Py_DECREF(ro_maps);
    Py_DECREF(refs);
    Py_DECREF(callback);
    if (!tracked && (view == NULL || view == Py_False))
        drop_pin(c, found.pin);
    return view;
}

FP_INTERNAL PyObject *
fp_view_impl(Ctl *c, PyObject *const *args)
{
    return view_impl(c, args, 0);
}

FP_INTERNAL PyObject *
fp_get_impl(Ctl *c, PyObject *const *args)
{
    return view_impl(c, args, 1);
}

/* Whether the key (its bytes and NUL, its hash) is in the store, read as
 * contains_optimistic() in read.py does: True or False, or None when a
 * writer was busy or got in the way (the Python path takes the lock). */
FP_INTERNAL PyObject *
fp_contains_impl(Ctl *c, PyObject *kbz, PyObject *hash_obj)
{
    if (!ctl_live(c))
        return NULL;
    int64_t hash = PyLong_AsLongLong(hash_obj);
    if (hash == -1 && PyErr_Occurred())
        return NULL;
    const char *key = PyBytes_AS_STRING(kbz);
    Py_ssize_t n = PyBytes_GET_SIZE(kbz);
    if (!key_ok(c, n))
        Py_RETURN_NONE;
    const int64_t *f = c->f;
    int64_t *h = c->h;
    int64_t seq = LD(&h[f[F_H_WSEQ]]);
    if ((seq & 1) || LD(&h[f[F_H_CLOSED]]))
        Py_RETURN_NONE;
    int64_t e = fp_find(c, key, n, hash);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (e == -2 || LD(&h[f[F_H_WSEQ]]) != seq)
        Py_RETURN_NONE;
    return PyBool_FromLong(e >= 0);
}
