/*
 * polystore._shm._fastpath: taking and dropping a store's locks where no
 * Python signal handler can run between the steps.
 *
 * A handler runs between two bytecodes and may raise (Ctrl-C): between taking
 * a lock and the code that drops it, it would leave the lock taken for good,
 * in this process (the thread lock) or in every process (the flock). These
 * functions do each such run of steps in one C call; Arena.acquire and
 * Arena.locked use them (see arena.py and tests/test_shm_interrupts.py).
 */
#define NO_IMPORT_ARRAY
#include "_fastpath.h"

static PyObject *s_lock, *s_fd, *s_holder, *str_acquire, *str_release, *str_abort;

/* hold(arena, blocking): arena._lock.acquire(blocking), and when it is taken,
 * arena._holder set to this thread's ident in the same C call. A Python
 * signal handler runs only between bytecodes: one that raises (Ctrl-C's
 * KeyboardInterrupt) right after a Python-level acquire() would leave the
 * lock taken with no record of its owner, which nothing could then release.
 * Here it finds the owner recorded, and Arena.acquire lets go. */
FP_INTERNAL PyObject *
fp_hold(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hold() takes the arena and blocking");
        return NULL;
    }
    PyObject *lock = PyObject_GetAttr(args[0], s_lock);
    if (lock == NULL)
        return NULL;
    PyObject *got = PyObject_CallMethodOneArg(lock, str_acquire, args[1]);
    if (got == Py_True) {
        PyObject *me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
        if (me == NULL || PyObject_SetAttr(args[0], s_holder, me) < 0) {
            Py_XDECREF(me);
            Py_CLEAR(got);
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyObject *r = PyObject_CallMethodNoArgs(lock, str_release);
            Py_XDECREF(r);
            PyErr_Restore(type, value, tb);
        }
        else {
            Py_DECREF(me);
        }
    }
    Py_DECREF(lock);
    return got;
}

/* let_go(arena): arena._holder = None, the flock on arena._fd dropped (when
 * there is an fd: dropping a flock not taken does nothing), arena._lock
 * released: every step, in one C call, so that no signal handler can run
 * between them (see hold). Raises the first error after doing the rest. */
FP_INTERNAL PyObject *
fp_let_go(PyObject *Py_UNUSED(module), PyObject *arena)
{
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (PyObject_SetAttr(arena, s_holder, Py_None) < 0)
        PyErr_Fetch(&type, &value, &tb);
    PyObject *fd_obj = PyObject_GetAttr(arena, s_fd);
    long fd = fd_obj == NULL ? -1 : PyLong_AsLong(fd_obj);
    Py_XDECREF(fd_obj);
    if (PyErr_Occurred()) {
        if (type == NULL)
            PyErr_Fetch(&type, &value, &tb);
        else
            PyErr_Clear();
    }
    if (fd >= 0 && flock((int)fd, LOCK_UN) < 0 && type == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        PyErr_Fetch(&type, &value, &tb);
    }
    PyObject *lock = PyObject_GetAttr(arena, s_lock);
    PyObject *r = lock == NULL ? NULL : PyObject_CallMethodNoArgs(lock, str_release);
    Py_XDECREF(lock);
    Py_XDECREF(r);
    if (r == NULL) {
        if (type == NULL)
            PyErr_Fetch(&type, &value, &tb);
        else
            PyErr_Clear();
    }
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- Section: ``with arena.locked:`` ------------------------------------------
 * Arena.acquire() on entry; on exit arena.release(), or arena.abort() after
 * an exception. In C, so that its __exit__ has no first bytecode at which a
 * signal handler could raise before anything runs: whatever release() or
 * abort() raise, even at their own first line, the exit finds the lock still
 * this thread's and lets go of it (let_go). A section whose commit never ran
 * leaves its journal, which the next holder rolls back, as a dead holder's. */
typedef struct {
    PyObject_HEAD
    PyObject *arena;
} Section;

static PyObject *
section_new(PyTypeObject *type, PyObject *args, PyObject *Py_UNUSED(kwds))
{
    PyObject *arena;
    if (!PyArg_ParseTuple(args, "O:Section", &arena))
        return NULL;
    Section *self = (Section *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->arena = Py_NewRef(arena);
    return (PyObject *)self;
}

static int
section_traverse(Section *self, visitproc visit, void *arg)
{
    Py_VISIT(self->arena);
    return 0;
}

static int
section_clear(Section *self)
{
    Py_CLEAR(self->arena);
    return 0;
}

static void
section_dealloc(Section *self)
{
    PyObject_GC_UnTrack(self);
    section_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
section_enter(Section *self, PyObject *Py_UNUSED(arg))
{
    PyObject *r = PyObject_CallMethodNoArgs(self->arena, str_acquire);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return Py_NewRef(self->arena);
}

static PyObject *
section_exit(Section *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__exit__ takes three arguments");
        return NULL;
    }
    PyObject *r = PyObject_CallMethodNoArgs(self->arena, args[0] == Py_None ? str_release
                                                                             : str_abort);
    if (r != NULL) {
        Py_DECREF(r);
        Py_RETURN_FALSE;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *holder = PyObject_GetAttr(self->arena, s_holder);
    PyObject *me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    int mine = holder != NULL && me != NULL && PyObject_RichCompareBool(holder, me, Py_EQ) == 1;
    Py_XDECREF(holder);
    Py_XDECREF(me);
    PyErr_Clear();
    if (mine) {
        PyObject *done = fp_let_go(NULL, self->arena);
        Py_XDECREF(done);
        PyErr_Clear();
    }
    PyErr_Restore(type, value, tb);
    return NULL;
}

static PyMethodDef section_methods[] = {
    {"__enter__", (PyCFunction)section_enter, METH_NOARGS, "arena.acquire(); the arena."},
    {"__exit__", (PyCFunction)(void (*)(void))section_exit, METH_FASTCALL,
     "arena.release(), or arena.abort() after an exception; the lock let go of "
     "whatever they raise."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SectionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "polystore._shm._fastpath.Section",
    .tp_basicsize = sizeof(Section),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Section(arena): ``with arena.locked:``, a locked section (see Arena.acquire).",
    .tp_new = section_new,
    .tp_traverse = (traverseproc)section_traverse,
    .tp_clear = (inquiry)section_clear,
    .tp_dealloc = (destructor)section_dealloc,
    .tp_methods = section_methods,
};

FP_INTERNAL int
fp_lock_init(PyObject *module)
{
    s_lock = PyUnicode_InternFromString("_lock");
    s_fd = PyUnicode_InternFromString("_fd");
    s_holder = PyUnicode_InternFromString("_holder");
    str_acquire = PyUnicode_InternFromString("acquire");
    str_release = PyUnicode_InternFromString("release");
    str_abort = PyUnicode_InternFromString("abort");
    if (!s_lock || !s_fd || !s_holder || !str_acquire || !str_release || !str_abort)
        return -1;
    if (PyType_Ready(&SectionType) < 0)
        return -1;
    Py_INCREF(&SectionType);
    if (PyModule_AddObject(module, "Section", (PyObject *)&SectionType) < 0) {
        Py_DECREF(&SectionType);
        return -1;
    }
    return 0;
}
