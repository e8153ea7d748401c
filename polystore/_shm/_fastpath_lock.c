/*
 * polystore._shm._fastpath: taking and dropping a store's locks where no
 * Python signal handler can run between the steps.
 *
 * A handler runs between two bytecodes and may raise (Ctrl-C): between taking
 * a lock and the code that drops it, it would leave the lock taken for good,
 * in this process (the thread lock) or in every process (the flock). These
 * functions do each such run of steps in one C call; Arena.acquire and
 * Arena.locked use them, and the fork hooks (fork_lock, fork_unlock) too
 * (see arena.py, fork.py and tests/test_shm_interrupts.py).
 */
#define NO_IMPORT_ARRAY
#include "_fastpath.h"

#include <fcntl.h>
#include <poll.h>
#include <time.h>

static PyObject *s_lock, *s_fd, *s_holder, *str_acquire, *str_release, *str_abort;
static PyObject *str_finish, *str_fallback;

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

/* arena.<method>() (release or abort). If it raises, even at its first line,
 * and this thread still holds the arena's lock, the lock is let go of
 * (let_go); the error stays set. A section whose commit never ran leaves its
 * journal to the next holder, as a dead holder's. A new reference, or NULL. */
static PyObject *
call_or_let_go(PyObject *arena, PyObject *method)
{
    PyObject *r = PyObject_CallMethodNoArgs(arena, method);
    if (r != NULL)
        return r;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *holder = PyObject_GetAttr(arena, s_holder);
    PyObject *me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    int mine = holder != NULL && me != NULL && PyObject_RichCompareBool(holder, me, Py_EQ) == 1;
    Py_XDECREF(holder);
    Py_XDECREF(me);
    PyErr_Clear();
    if (mine) {
        PyObject *done = fp_let_go(NULL, arena);
        Py_XDECREF(done);
        PyErr_Clear();
    }
    PyErr_Restore(type, value, tb);
    return NULL;
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
    PyObject *r = call_or_let_go(self->arena, args[0] == Py_None ? str_release : str_abort);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
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

/* -- the fork hooks' locks (polystore._shm.fork) ------------------------------
 * A process that forks while it holds views keeps those stores locked until
 * the child has pinned what it inherited. A handler that raised between
 * taking those locks and noting them, or at the first line of the hook that
 * drops them after the fork (CPython reports an exception in a fork hook and
 * goes on), would leave them taken for good. So both hooks are C calls: the
 * only Python code they run is Arena.acquire() and Arena.abort(), each of
 * which lets go of its locks whatever it raises (abort() through the same
 * fallback as Section.__exit__). The state is a list [held, r, w]: the
 * arenas locked for the child, and the pipe of its "done". */

/* abort() each arena of list held (call_or_let_go). held is emptied. 0, or
 * -1 with the first error set. */
static int
abort_all(PyObject *held)
{
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(held); i++) {
        PyObject *r = call_or_let_go(PyList_GET_ITEM(held, i), str_abort);
        if (r != NULL) {
            Py_DECREF(r);
            continue;
        }
        if (type == NULL)
            PyErr_Fetch(&type, &value, &tb);
        else
            PyErr_Clear();
    }
    if (PyList_SetSlice(held, 0, PyList_GET_SIZE(held), NULL) < 0 && type == NULL)
        PyErr_Fetch(&type, &value, &tb);
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
        return -1;
    }
    return 0;
}

static int
fork_state(PyObject *state, PyObject **held)
{
    if (!PyList_Check(state) || PyList_GET_SIZE(state) != 3
            || !PyList_Check(PyList_GET_ITEM(state, 0))) {
        PyErr_SetString(PyExc_TypeError, "the fork state is a list [held, r, w]");
        return -1;
    }
    *held = PyList_GET_ITEM(state, 0);
    return 0;
}

static int
set_fd(PyObject *state, Py_ssize_t i, int fd)
{
    PyObject *n = PyLong_FromLong(fd);
    return n == NULL ? -1 : PyList_SetItem(state, i, n);  /* (steals n) */
}

/* fork_lock(state, arenas, closed): arena.acquire() of each of arenas, each
 * one taken appended to state's held in the same C call; an arena that raises
 * closed (StoreClosedError) is skipped. If any was taken, a pipe for the
 * child's "done" goes into state. On any other error, every arena taken is
 * let go of again (abort) and the error raised: the fork goes on with no
 * hand-off, as it does when no pipe can be made. */
FP_INTERNAL PyObject *
fp_fork_lock(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *held;
    if (nargs != 3 || fork_state(args[0], &held) < 0 || !PyList_Check(args[1])) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "fork_lock() takes the state, a list, a class");
        return NULL;
    }
    PyObject *arenas = args[1];
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(arenas); i++) {
        PyObject *arena = PyList_GET_ITEM(arenas, i);
        PyObject *r = PyObject_CallMethodNoArgs(arena, str_acquire);
        if (r == NULL) {
            if (PyErr_ExceptionMatches(args[2])) {
                PyErr_Clear();  /* closed meanwhile: its views need nothing from us */
                continue;
            }
            goto undo;
        }
        int taken = r == Py_True;
        Py_DECREF(r);
        if (taken && PyList_Append(held, arena) < 0) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyObject *done = fp_let_go(NULL, arena);  /* (no section began: nothing to undo) */
            Py_XDECREF(done);
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
            goto undo;
        }
    }
    if (PyList_GET_SIZE(held) > 0) {
        int fds[2];
        if (pipe2(fds, O_CLOEXEC) < 0) {  /* no pipe, no hand-off: the child's views as before */
            if (abort_all(held) < 0)
                return NULL;
            Py_RETURN_NONE;
        }
        if (set_fd(args[0], 1, fds[0]) < 0 || set_fd(args[0], 2, fds[1]) < 0) {
            close(fds[0]);
            close(fds[1]);
            goto undo;
        }
    }
    Py_RETURN_NONE;
undo:;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (abort_all(held) < 0)
        PyErr_Clear();
    PyErr_Restore(type, value, tb);
    return NULL;
}

/* fork_unlock(state, timeout_ms): in the parent after the fork, wait up to
 * timeout_ms for the child's byte (or the end of the pipe, if it died first),
 * then abort() every arena of state's held and close the pipe. Signals that
 * arrive meanwhile are handled once this call has returned. */
FP_INTERNAL PyObject *
fp_fork_unlock(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *held;
    long timeout_ms = nargs == 2 ? PyLong_AsLong(args[1]) : -1;
    if (nargs != 2 || (timeout_ms < 0 && PyErr_Occurred()) || fork_state(args[0], &held) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "fork_unlock() takes the state and a timeout");
        return NULL;
    }
    long r = PyLong_AsLong(PyList_GET_ITEM(args[0], 1));
    long w = PyLong_AsLong(PyList_GET_ITEM(args[0], 2));
    if (PyErr_Occurred())
        return NULL;
    if (r >= 0 && w >= 0) {
        close((int)w);
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        long left = timeout_ms;
        struct pollfd pfd = {.fd = (int)r, .events = POLLIN};
        int got;
        for (;;) {
            Py_BEGIN_ALLOW_THREADS
            got = poll(&pfd, 1, (int)left);
            Py_END_ALLOW_THREADS
            if (got >= 0 || errno != EINTR)
                break;
            clock_gettime(CLOCK_MONOTONIC, &now);
            left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000
                                 + (now.tv_nsec - start.tv_nsec) / 1000000);
            if (left <= 0)
                break;
        }
        close((int)r);
    }
    int failed = set_fd(args[0], 1, -1) < 0 || set_fd(args[0], 2, -1) < 0;
    /* The parent changed nothing in these sections; whatever the journal
     * holds is a row claim of a child that died half way: abort undoes it. */
    if (abort_all(held) < 0 || failed)
        return NULL;
    Py_RETURN_NONE;
}

/* -- ExitGuard: a context manager whose __exit__ has no first bytecode -------
 * A Python __exit__ that a signal handler's exception cuts short at its first
 * line runs none of its clean-up: a create() block's taken block would stay
 * this process's until it ends. ExitGuard.__exit__ is C: it calls
 * self._finish(exc_type, exc, tb), and if that raises, self._fallback() (whose
 * own errors are dropped) before raising the first error. A base for
 * write.create. */
static PyObject *
guard_exit(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "__exit__ takes three arguments");
        return NULL;
    }
    PyObject *r = PyObject_CallMethodObjArgs(self, str_finish, args[0], args[1], args[2], NULL);
    if (r != NULL)
        return r;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *done = PyObject_CallMethodNoArgs(self, str_fallback);
    Py_XDECREF(done);
    PyErr_Clear();
    PyErr_Restore(type, value, tb);
    return NULL;
}

static PyMethodDef guard_methods[] = {
    {"__exit__", (PyCFunction)(void (*)(void))guard_exit, METH_FASTCALL,
     "self._finish(exc_type, exc, tb); self._fallback() if that raised."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GuardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "polystore._shm._fastpath.ExitGuard",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A base for context managers whose __exit__ must start: see _finish, _fallback.",
    .tp_new = PyType_GenericNew,
    .tp_methods = guard_methods,
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
    str_finish = PyUnicode_InternFromString("_finish");
    str_fallback = PyUnicode_InternFromString("_fallback");
    if (!s_lock || !s_fd || !s_holder || !str_acquire || !str_release || !str_abort || !str_finish
            || !str_fallback)
        return -1;
    if (PyType_Ready(&GuardType) < 0)
        return -1;
    Py_INCREF(&GuardType);
    if (PyModule_AddObject(module, "ExitGuard", (PyObject *)&GuardType) < 0) {
        Py_DECREF(&GuardType);
        return -1;
    }
    if (PyType_Ready(&SectionType) < 0)
        return -1;
    Py_INCREF(&SectionType);
    if (PyModule_AddObject(module, "Section", (PyObject *)&SectionType) < 0) {
        Py_DECREF(&SectionType);
        return -1;
    }
    return 0;
}
