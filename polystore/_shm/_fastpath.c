/*
 * polystore._shm._fastpath: the hot paths of SharedArrayStore in C.
 *
 * The pure-Python paths in read.py and write.py define the
 * semantics; this module repeats their common cases with far fewer memory
 * accesses and no bytecode:
 *
 *   Ctl.view(): a get(): the lock-free lookup and pin of get_optimistic(),
 *       then the view; the value's description comes from the cache, or is
 *       decoded here from its entry when this process knows its dtype text
 *       (layout.DTYPES), as for a key it meets for the first time;
 *   Ctl.get(): the same lookup and pin, for the Python path to make a view;
 *   Ctl.contains(): the same lookup, nothing pinned (`key in store`);
 *   Ctl.put_small(): a small put of a key's same dtype and shape into a free
 *       block of its size class, the steady state of a value handed over
 *       again and again, journaled like every locked section;
 *   Ctl.take(): a block off a free list for create() or a large put;
 *   Ctl.publish(): the end of create() for a new key: a value made in place
 *       installed in a fresh entry, journaled (a pipeline's hand-off);
 *   Ctl.remove(): a key and its companion removed together (a file's delete
 *       with its metadata), journaled;
 *   Ctl.pin_add(): the one way this process changes its row of the pin
 *       table while the fast path is on (an atomic add), which is what lets
 *       the read path pin without the store's thread lock.
 *
 * Anything else (a new key to put, another shape, a block in use, a store closed or
 * shrunk meanwhile, a mapping this process has not made yet) is declined with
 * a return value, and the caller runs the Python path. Nothing here raises for
 * such cases, and nothing here allocates memory in the store.
 *
 * The table geometry and field numbers come from Python (polystore._shm.layout) when a
 * Ctl is made, so the layout is written down in one place only.
 */
#include "_fastpath.h"

static PyObject *str_locked;  /* interned method name */
FP_INTERNAL PyObject *fp_test_hook;
FP_INTERNAL long fp_kill_at, fp_steps;
FP_INTERNAL PyObject *fp_str_dtype;
FP_INTERNAL PyObject *fp_str_C, *fp_str_F;

PyDoc_STRVAR(ctl_get_doc,
"get(arena, kbz, hash) -> tuple | None | False\n\n"
"Look a key up and pin its block without the store lock (a seqlock read), then\n"
"make the read-only view of the block, tracked as Arena.track() does (unpinned\n"
"once no view is left), all in this one call: (view, the value's flags). None\n"
"if the key is absent; False, with nothing pinned, when the Python path must\n"
"decide (a writer was busy or got in the way, the store changed, the value's\n"
"description is neither cached in arena.meta nor of a dtype text in\n"
"layout.DTYPES, a process without a row in the pin table, an empty value, or\n"
"a segment not mapped for reading at its current generation).\n"
"arena is the store's polystore._shm.arena.Arena in this process.");

PyDoc_STRVAR(ctl_view_doc,
"view(arena, key) -> ndarray | None | False\n\n"
"get() of a key found in the key cache, returning the view alone; False also\n"
"for a key not in the cache.");

PyDoc_STRVAR(ctl_put_doc,
"put_small(arena, key, array[, absent[, present]]) -> bool\n\n"
"Take the store lock (flock on arena._fd, without waiting) and put a\n"
"C-contiguous array under a key in the key cache when the Python path would\n"
"do just that: the key's current description, cached in arena.meta, has the\n"
"array's dtype and shape; a free block of its size class is at the head of\n"
"the free list, in a segment mapped writable here; no segment becomes busy\n"
"or idle. The array is copied into that block, the key pointed at it and the\n"
"old block retired, every change journaled (see polystore._shm.tables).\n"
"Returns False, having changed nothing, in every other case: for arrays of\n"
"over small_put bytes or empty ones, when a key of absent is in the store or\n"
"one of present is not (tuples of key parts, as keys.key_parts makes them),\n"
"while another thread of this process is in the store, while another process\n"
"holds the lock, and when a dead lock holder left work to finish.");

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

/* CRC-32 (IEEE, as zlib.crc32), a bit at a time: keys are short, and a
 * table would be one more thing to miss in a cold cache. */
static uint32_t
crc32_of(const char *data, Py_ssize_t n)
{
    uint32_t crc = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < n; i++) {
        crc ^= (unsigned char)data[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* The parts of a key, (bytes, bytes + NUL, 31-bit hash) as keys.key_parts()
 * makes them (a new reference): from the cache, or made here and cached for
 * a str of 1 to max_key UTF-8 bytes without NUL. NULL, without an error, for
 * anything else (the Python path validates it, and says what is wrong). */
static PyObject *
key_parts(PyObject *key, Py_ssize_t max_key)
{
    if (key_cache == NULL || !PyUnicode_CheckExact(key))
        return NULL;
    PyObject *parts = PyDict_GetItemWithError(key_cache, key);  /* borrowed */
    if (parts != NULL) {
        if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) != 3
                || !PyBytes_Check(PyTuple_GET_ITEM(parts, 1)))
            return NULL;
        return Py_NewRef(parts);
    }
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(key, &n);
    if (text == NULL || n < 1 || n > max_key || memchr(text, 0, n) != NULL) {
        PyErr_Clear();  /* a lone surrogate, say: Python encodes those its own way */
        return NULL;
    }
    PyObject *kb = PyBytes_FromStringAndSize(text, n);
    PyObject *kbz = PyBytes_FromStringAndSize(text, n + 1);  /* with its NUL */
    PyObject *hash = PyLong_FromUnsignedLong(crc32_of(text, n) & 0x7FFFFFFFu);
    parts = kb && kbz && hash ? PyTuple_Pack(3, kb, kbz, hash) : NULL;
    Py_XDECREF(kb);
    Py_XDECREF(kbz);
    Py_XDECREF(hash);
    if (parts == NULL || (PyDict_GET_SIZE(key_cache) < 4096
                          && PyDict_SetItem(key_cache, key, parts) < 0)) {
        Py_XDECREF(parts);
        PyErr_Clear();
        return NULL;
    }
    return parts;
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
    return with_row(c, args[0], args[1], args[2], fp_get_impl);
}

static PyObject *
ctl_view(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 2, "view", "the arena and the key") < 0)
        return NULL;
    PyObject *parts = key_parts(args[1], c->f[F_E_DTYPE] - c->f[F_E_KEY] - 1);
    if (parts == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    PyObject *r = with_row(c, args[0], PyTuple_GET_ITEM(parts, 1), PyTuple_GET_ITEM(parts, 2),
                           fp_view_impl);
    Py_DECREF(parts);
    return r;
}

static PyObject *
ctl_contains(Ctl *c, PyObject *key)
{
    PyObject *parts = key_parts(key, c->f[F_E_DTYPE] - c->f[F_E_KEY] - 1);
    if (parts == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    PyObject *r = fp_contains_impl(c, PyTuple_GET_ITEM(parts, 1), PyTuple_GET_ITEM(parts, 2));
    Py_DECREF(parts);
    return r;
}

/* The arena's fd, epoch and slot in got[0..2], and *busy set when a thread of
 * this process is in the store (it holds the thread lock, perhaps while it
 * waits for the flock) or unpins wait: then the C writes leave the work to
 * the Python path. 0, or -1 with an exception; got holds five new
 * references unless -1. */
static int
quiet_arena(PyObject *arena, PyObject **got, int *busy)
{
    PyObject *names[5] = {s_fd, s_epoch, s_slot, s_lock, s_pending};
    if (fetch(arena, names, got, 5) < 0)
        return -1;
    *busy = 1;
    if (!PyList_Check(got[4]) || PyList_GET_SIZE(got[4]) > 0)
        return 0;
    PyObject *held = PyObject_CallMethodNoArgs(got[3], str_locked);
    if (held == NULL) {
        drop(got, 5);
        return -1;
    }
    *busy = held != Py_False;
    Py_DECREF(held);
    return 0;
}

/* impl(c, inner), inner being the arena's fd, epoch and slot followed by
 * rest[0..n) (NULL for an argument not given), when no thread of this process
 * is in the store (quiet_arena); `declined` otherwise. The entry point of
 * every write in C. */
static PyObject *
call_quiet(Ctl *c, PyObject *arena, PyObject *(*impl)(Ctl *, PyObject *const *),
           PyObject *const *rest, int n, PyObject *declined)
{
    PyObject *got[5];
    int busy;
    if (quiet_arena(arena, got, &busy) < 0)
        return NULL;
    PyObject *r;
    if (busy) {
        r = Py_NewRef(declined);
    } else {
        PyObject *inner[12] = {got[0], got[1], got[2]};
        for (int j = 0; j < n && j < 9; j++)
            inner[3 + j] = rest[j];
        r = impl(c, inner);
    }
    drop(got, 5);
    return r;
}

/* args[i] if given, else NULL */
#define OPTIONAL(i) (nargs > (i) ? args[i] : NULL)

static PyObject *
ctl_put_small(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "put_small() takes the arena, the key, the array, "
                        "and perhaps the key parts that must be absent and present");
        return NULL;
    }
    PyObject *parts = key_parts(args[1], c->f[F_E_DTYPE] - c->f[F_E_KEY] - 1);
    if (parts == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    PyObject *rest[5] = {PyTuple_GET_ITEM(parts, 1), PyTuple_GET_ITEM(parts, 2), args[2],
                         OPTIONAL(3), OPTIONAL(4)};
    PyObject *r = call_quiet(c, args[0], fp_put_impl, rest, 5, Py_False);
    Py_DECREF(parts);
    return r;
}

static PyObject *
ctl_publish(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 8 || nargs > 10) {
        PyErr_SetString(PyExc_TypeError, "publish() takes the arena, the key's bytes and NUL, "
                        "its hash, the block, nbytes, the dtype text, the shape and the flags, "
                        "and perhaps the key parts that must be absent and present");
        return NULL;
    }
    PyObject *rest[9] = {args[1], args[2], args[3], args[4], args[5], args[6], args[7],
                         OPTIONAL(8), OPTIONAL(9)};
    return call_quiet(c, args[0], fp_publish_impl, rest, 9, Py_False);
}

static PyObject *
ctl_take(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs(nargs, 3, "take", "the arena, the size class and a list") < 0)
        return NULL;
    if (!PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "take(): the block goes into a list");
        return NULL;
    }
    PyObject *none_taken = PyLong_FromLong(-1);
    if (none_taken == NULL)
        return NULL;
    PyObject *r = call_quiet(c, args[0], fp_take_impl, &args[1], 1, none_taken);
    Py_DECREF(none_taken);
    /* The block is this process's from here: into the caller's list in this
     * same call, so that an exception (a signal handler's) before the caller
     * sees the result cannot lose it (write.take). */
    if (r != NULL && PyLong_AsLongLong(r) >= 0 && PyList_Append(args[2], r) < 0)
        Py_CLEAR(r);
    return r;
}

static PyObject *
ctl_remove(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "remove() takes the arena, a key's bytes and NUL and "
                        "its hash, and perhaps its companion's");
        return NULL;
    }
    PyObject *rest[4] = {args[1], args[2], OPTIONAL(3), OPTIONAL(4)};
    return call_quiet(c, args[0], fp_remove_impl, rest, 4, Py_None);
}

#undef OPTIONAL

/* -- the type and the module ------------------------------------------------- */

static int
ctl_clear(Ctl *c)
{
    Py_CLEAR(c->meta);
    Py_CLEAR(c->ro_maps);
    Py_CLEAR(c->rw_maps);
    Py_CLEAR(c->refs);
    Py_CLEAR(c->view_dead);
    Py_CLEAR(c->dtypes);
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
    Py_VISIT(c->dtypes);
    return 0;
}

static PyObject *
ctl_bind(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])
            || !PyDict_Check(args[2]) || !PyDict_Check(args[3]) || !PyCallable_Check(args[4])
            || !PyDict_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "bind(meta: dict, ro_maps: dict, rw_maps: dict, "
                        "refs: dict, view_dead, dtypes: dict)");
        return NULL;
    }
    Py_XSETREF(c->meta, Py_NewRef(args[0]));
    Py_XSETREF(c->ro_maps, Py_NewRef(args[1]));
    Py_XSETREF(c->rw_maps, Py_NewRef(args[2]));
    Py_XSETREF(c->refs, Py_NewRef(args[3]));
    Py_XSETREF(c->view_dead, Py_NewRef(args[4]));
    Py_XSETREF(c->dtypes, Py_NewRef(args[5]));
    Py_RETURN_NONE;
}

/* The count of index (a Python int) in the pin table, or NULL with IndexError. */
static int32_t *
pin_at(Ctl *c, PyObject *index_obj, const char *name)
{
    long long index = PyLong_AsLongLong(index_obj);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= c->max_procs * c->max_blocks) {
        PyErr_Format(PyExc_IndexError, "%s(%lld): no such count", name, index);
        return NULL;
    }
    return &c->pins[index];
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
    long delta = PyLong_AsLong(args[1]);
    if (delta == -1 && PyErr_Occurred())
        return NULL;
    if (delta < INT32_MIN || delta > INT32_MAX) {
        PyErr_Format(PyExc_IndexError, "pin_add(): a delta of %ld", delta);
        return NULL;
    }
    int32_t *pin = pin_at(c, args[0], "pin_add");
    if (pin == NULL)
        return NULL;
    pin_atomic(pin, (int32_t)delta);
    Py_RETURN_NONE;
}

/* pin_tracked(base, index, b): pin count index of this process's row, and
 * watch base (which every view of block b keeps alive) so that its death
 * unpins, in one C call: a signal handler that raised between a Python-level
 * pin and its watch would leave the block pinned for the life of the process
 * (create(), write.py). On failure the pin is dropped again. */
static PyObject *
ctl_pin_tracked(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "pin_tracked(base, index, block)");
        return NULL;
    }
    if (!ctl_live(c))
        return NULL;
    int32_t *pin = pin_at(c, args[1], "pin_tracked");
    long long b = pin == NULL ? -1 : PyLong_AsLongLong(args[2]);
    if (pin == NULL || (b == -1 && PyErr_Occurred()))
        return NULL;
    if (c->refs == NULL || c->view_dead == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pin_tracked(): the arena is not bound");
        return NULL;
    }
    pin_atomic(pin, 1);
    if (fp_watch(c->refs, c->view_dead, args[0], b) < 0) {
        pin_atomic(pin, -1);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* A long attribute of the arena, or -1 with an exception set. */
static long long
arena_long(PyObject *arena, const char *name)
{
    PyObject *v = PyObject_GetAttrString(arena, name);
    if (v == NULL)
        return -1;
    long long n = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return n;
}

/* view_dead(arena, ref): the weak-reference callback of every view, as
 * Arena._view_dead in Python, in one C call: a Python signal handler that
 * raises (Ctrl-C) cannot come between the view's forgetting and its unpin,
 * which would leave the block pinned until the process ends. The Python
 * path does what C does not: a process with no row yet, the store closed,
 * leaving the store. */
static PyObject *
ctl_view_dead(Ctl *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "view_dead(arena, ref)");
        return NULL;
    }
    PyObject *arena = args[0];
    if (c->refs == NULL || c->buf.obj == NULL)
        return PyObject_CallMethod(arena, "_view_dead", "O", args[1]);
    PyObject *key = PyLong_FromVoidPtr(args[1]);
    if (key == NULL)
        return NULL;
    PyObject *item = PyDict_GetItemWithError(c->refs, key);
    if (item == NULL) {
        Py_DECREF(key);
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    long long b = PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2
                      ? PyLong_AsLongLong(PyTuple_GET_ITEM(item, 1)) : -1;
    long long slot = arena_long(arena, "slot");
    long long base = arena_long(arena, "pin_base");
    PyObject *closed = PyObject_GetAttrString(arena, "closed");
    int is_closed = closed == NULL ? -1 : PyObject_IsTrue(closed);
    Py_XDECREF(closed);
    if (PyErr_Occurred() || is_closed || slot < 0 || b < 0 || b >= c->max_blocks
            || base < 0 || base + b >= c->max_procs * c->max_blocks) {
        /* anything unusual: the Python callback decides, the entry still there */
        PyErr_Clear();
        Py_DECREF(key);
        return PyObject_CallMethod(arena, "_view_dead", "O", args[1]);
    }
    if (PyDict_DelItem(c->refs, key) < 0) {
        Py_DECREF(key);
        return NULL;
    }
    Py_DECREF(key);
    pin_atomic(&c->pins[base + b], -1);
    if (PyDict_GET_SIZE(c->refs) == 0) {  /* the last view: perhaps leave the store */
        long long handles = arena_long(arena, "handles");
        PyObject *leave = PyObject_GetAttrString(arena, "leave_when_unused");
        int wants = leave == NULL ? -1 : PyObject_IsTrue(leave);
        Py_XDECREF(leave);
        if (PyErr_Occurred())
            return NULL;
        if (handles <= 0 && wants)
            return PyObject_CallMethod(arena, "leave", NULL);
    }
    Py_RETURN_NONE;
}

static PyObject *
ctl_release(Ctl *c, PyObject *Py_UNUSED(ignored))
{
    ctl_clear(c);
    if (c->buf.obj != NULL)
        PyBuffer_Release(&c->buf);
    c->h = c->ht = c->bq = c->sq = c->log = NULL;
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
    if (PyTuple_GET_SIZE(offsets) != 7 || PyTuple_GET_SIZE(geometry) != 5
            || PyTuple_GET_SIZE(fields) != N_FIELDS) {
        PyErr_Format(PyExc_ValueError,
            "Ctl() takes 7 offsets, 5 geometry values and %d field numbers", N_FIELDS);
        return -1;
    }
    int64_t off[7], geo[5];
    for (int i = 0; i < 7; i++)
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
     * by writing out of bounds. Sections: header, ht, ent, blk, seg, pins, log;
     * the header first, the others anywhere after it, none overlapping. */
    const int64_t *f = c->f;
    int ok = 1;
    for (int i = 0; i < 5; i++)
        ok &= geo[i] > 0 && geo[i] < ((int64_t)1 << 32);
    for (int i = 0; i < N_FIELDS; i++)
        ok &= f[i] >= 0 && (f[i] < 4096 || i == F_LOG_RECORDS);
    ok &= f[F_LOG_RECORDS] < ((int64_t)1 << 32);
    int64_t header_slots = 0;
    for (int i = F_H_WSEQ; i <= F_H_CLASS0; i++)
        header_slots = f[i] + 1 > header_slots ? f[i] + 1 : header_slots;
    int64_t longest_entry_field = 0;
    for (int i = F_E_BLOCK; i <= F_E_MSEQ; i++)
        longest_entry_field = f[i] > longest_entry_field ? f[i] : longest_entry_field;
    ok &= ((geo[0] + 1) & geo[0]) == 0;  /* mask + 1: a power of two */
    ok &= f[F_ENT_SIZE] % 8 == 0 && f[F_E_SHAPE] % 8 == 0 && f[F_E_SHAPE] < f[F_ENT_SIZE];
    ok &= (longest_entry_field + 1) * 8 <= f[F_E_KEY] && f[F_E_KEY] < f[F_E_DTYPE]
          && f[F_E_DTYPE] < f[F_E_SHAPE];
    ok &= f[F_B_SEG] < f[F_BLK_FIELDS] && f[F_B_OFF] < f[F_BLK_FIELDS]
          && f[F_B_CLS] < f[F_BLK_FIELDS] && f[F_B_STATE] < f[F_BLK_FIELDS]
          && f[F_B_NEXT] < f[F_BLK_FIELDS] && f[F_B_PREV] < f[F_BLK_FIELDS]
          && f[F_B_OWNER] < f[F_BLK_FIELDS] && f[F_S_GEN] < f[F_SEG_FIELDS]
          && f[F_S_USED] < f[F_SEG_FIELDS] && f[F_LOG_RECORDS] > 64;
    ok &= f[F_H_CLASS0] + n_classes <= 4096;
    header_slots = f[F_H_CLASS0] + n_classes > header_slots ? f[F_H_CLASS0] + n_classes
                                                            : header_slots;
    if (ok) {
        int64_t need[7] = {
            header_slots * 8, (geo[0] + 1) * 8, geo[1] * f[F_ENT_SIZE],
            geo[2] * f[F_BLK_FIELDS] * 8, geo[3] * f[F_SEG_FIELDS] * 8, geo[4] * geo[2] * 4,
            f[F_LOG_RECORDS] * 16,
        };
        ok &= off[0] == 0;
        for (int i = 0; i < 7; i++) {
            ok &= off[i] >= 0 && off[i] % 8 == 0 && need[i] > 0
                  && off[i] + need[i] <= (int64_t)c->buf.len;
            for (int j = 0; j < i; j++)
                ok &= off[i] + need[i] <= off[j] || off[j] + need[j] <= off[i];
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
    c->log = (int64_t *)(base + off[6]);
    c->words = (int64_t)c->buf.len / 8;
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

static Py_ssize_t max_key_bytes;  /* layout.MAX_KEY_BYTES, from set_key_cache() */

static PyObject *
set_key_cache(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "set_key_cache(cache: dict, max_key_bytes: int)");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_XSETREF(key_cache, Py_NewRef(args[0]));
    max_key_bytes = n;
    Py_RETURN_NONE;
}

static PyObject *
module_key_parts(PyObject *Py_UNUSED(module), PyObject *key)
{
    PyObject *parts = key_parts(key, max_key_bytes);
    if (parts == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return parts;
}

static PyObject *
set_test_hook(PyObject *Py_UNUSED(module), PyObject *hook)
{
    Py_XSETREF(fp_test_hook, hook == Py_None ? NULL : Py_NewRef(hook));
    Py_RETURN_NONE;
}

static PyObject *
arm_faults(PyObject *Py_UNUSED(module), PyObject *at)
{
    long n = PyLong_AsLong(at);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    long taken = fp_steps;
    fp_kill_at = n;
    fp_steps = 0;
    return PyLong_FromLong(taken);
}

static PyObject *
fault_step(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg))
{
    fp_step();
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"let_go", fp_let_go, METH_O,
     "let_go(arena): arena._holder = None, the flock on arena._fd dropped, arena._lock\n"
     "released, with no bytecode between (see Arena.acquire)."},
    {"hold", (PyCFunction)(void (*)(void))fp_hold, METH_FASTCALL,
     "hold(arena, blocking) -> bool\n\n"
     "arena._lock.acquire(blocking), and arena._holder set to this thread's ident\n"
     "when it is taken, with no bytecode between (see Arena.acquire)."},
    {"fork_lock", (PyCFunction)(void (*)(void))fp_fork_lock, METH_FASTCALL,
     "fork_lock(state, arenas, closed): before a fork, acquire() each arena and note\n"
     "those taken in state [held, r, w], with a pipe for the child, with no bytecode\n"
     "between a lock and its note (see polystore._shm.fork)."},
    {"fork_unlock", (PyCFunction)(void (*)(void))fp_fork_unlock, METH_FASTCALL,
     "fork_unlock(state, timeout_ms): in the parent after a fork, wait for the\n"
     "child's byte, then abort() every arena held, letting go of any that raises."},
    {"_fault_step", fault_step, METH_NOARGS,
     "Tests only: one step of the Python write path, on the same count as the C "
     "steps, so that a path that runs in both dies at the step the test chose."},
    {"_arm_faults", arm_faults, METH_O,
     "Tests only: count the steps of the write path from now on and SIGKILL this "
     "process at step n (-1: never, 0: stop counting); returns the steps taken since "
     "the previous call."},
    {"set_key_cache", (PyCFunction)(void (*)(void))set_key_cache, METH_FASTCALL,
     "set_key_cache(cache, max_key_bytes): the dict of valid keys that the C "
     "paths look keys up in and add keys to, str -> (bytes, bytes + NUL, hash), "
     "as polystore.shmstore keeps it, and the longest key in UTF-8 bytes."},
    {"key_parts", module_key_parts, METH_O,
     "key_parts(key) -> tuple | None\n\n"
     "(bytes, bytes + NUL, 31-bit hash) of a str of 1 to 255 UTF-8 bytes\n"
     "without NUL, from the key cache or made and cached there; None for\n"
     "anything else (the Python path validates it)."},
    {"_set_test_hook", set_test_hook, METH_O,
     "Tests only: call hook() inside every get(), between the pin and the check "
     "(None removes it)."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef ctl_methods[] = {
    {"get", (PyCFunction)(void (*)(void))ctl_get, METH_FASTCALL, ctl_get_doc},
    {"view", (PyCFunction)(void (*)(void))ctl_view, METH_FASTCALL, ctl_view_doc},
    {"take", (PyCFunction)(void (*)(void))ctl_take, METH_FASTCALL,
     "take(arena, cls, into) -> int\n\n"
     "Take the block at the head of size class cls's free list for this process\n"
     "to fill (WRITING), in one journaled section under the flock, and append it\n"
     "to the list into in the same call; -1, having changed nothing, when the list\n"
     "is empty or in the cases publish() declines."},
    {"remove", (PyCFunction)(void (*)(void))ctl_remove, METH_FASTCALL,
     "remove(arena, kbz, hash[, ckbz, chash]) -> bool | None\n\n"
     "Remove a key and, if present, its companion (a file's metadata) in one\n"
     "journaled section under the flock, freeing their blocks (retiring those a\n"
     "view pins): True if removed, False if the key is absent (nothing changed),\n"
     "None if declined (the lock busy, a segment to evict, anything unusual)."},
    {"contains", (PyCFunction)ctl_contains, METH_O,
     "contains(key) -> bool | None\n\n"
     "Whether key is in the store, looked up without the lock (a seqlock read);\n"
     "None when the Python path must decide (a writer busy or in the way, a\n"
     "closed store, a key that is not a valid str)."},
    {"put_small", (PyCFunction)(void (*)(void))ctl_put_small, METH_FASTCALL, ctl_put_doc},
    {"publish", (PyCFunction)(void (*)(void))ctl_publish, METH_FASTCALL,
     "publish(arena, kbz, hash, block, nbytes, dt, shape, flags[, absent[, present]]) -> bool\n\n"
     "Install block, which this process filled in place (create), under a new\n"
     "key, in one journaled section under the flock. Returns False, having\n"
     "changed nothing, in every other case: a key that exists, a key of absent\n"
     "present or one of present absent (as for put_small), no free entry record, another\n"
     "thread of this process or another process in the store, or work a dead\n"
     "lock holder left to finish."},
    {"bind", (PyCFunction)(void (*)(void))ctl_bind, METH_FASTCALL,
     "bind(meta, ro_maps, rw_maps, refs, view_dead, dtypes): the arena's objects that never "
     "change, which get(), view() and put_small() use."},
    {"pin_add", (PyCFunction)(void (*)(void))ctl_pin_add, METH_FASTCALL,
     "pin_add(index, delta): change a count of this process's row of the pin table "
     "atomically (never below zero). With the fast path on, every change to the row goes "
     "through here, so that the lock-free get() needs no thread lock."},
    {"pin_tracked", (PyCFunction)(void (*)(void))ctl_pin_tracked, METH_FASTCALL,
     "pin_tracked(base, index, block): pin_add(index, 1) and watch base so that its "
     "death unpins block (Arena.track), in one C call."},
    {"view_dead", (PyCFunction)(void (*)(void))ctl_view_dead, METH_FASTCALL,
     "view_dead(arena, ref): the weak-reference callback of a view, in one C call "
     "(Arena.view_dead binds it to its arena)."},
    {"release", (PyCFunction)ctl_release, METH_NOARGS,
     "Give the control segment's buffer back (every later call raises ValueError)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CtlType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "polystore._shm._fastpath.Ctl",
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
    .m_name = "polystore._shm._fastpath",
    .m_doc = "The hot paths of SharedArrayStore in C (optional; see polystore._shm.fast).",
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
    fp_str_dtype = PyUnicode_InternFromString("dtype");
    fp_str_C = PyUnicode_InternFromString("C");
    fp_str_F = PyUnicode_InternFromString("F");
    if (str_locked == NULL || fp_str_dtype == NULL || fp_str_C == NULL || fp_str_F == NULL)
        return NULL;
    if (_import_array() < 0)  /* numpy's C API, checked against the numpy that runs */
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (fp_lock_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CtlType);
    if (PyModule_AddObject(m, "Ctl", (PyObject *)&CtlType) < 0) {
        Py_DECREF(&CtlType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
