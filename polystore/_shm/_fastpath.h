/*
 * polystore._shm._fastpath: declarations shared by its files.
 *
 *   _fastpath.c        the module, the Ctl type and its entry points
 *   _fastpath_read.c   the lock-free lookup, pin and view (get)
 *   _fastpath_write.c  a locked section's helpers; the small put, journaled
 *   _fastpath_keys.c   take a block, publish a new key, remove keys
 *   _fastpath_lock.c   the store's locks and the fork hooks
 *
 * See _fastpath.c for what the module is for.
 */
#ifndef POLYSTORE_FASTPATH_H
#define POLYSTORE_FASTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
/* one table of numpy's C API for the three files; _fastpath.c imports it */
#define PY_ARRAY_UNIQUE_SYMBOL polystore_fastpath_ARRAY_API
#include <numpy/arrayobject.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

/* Symbols shared between the files, not exported from the extension. */
#define FP_INTERNAL __attribute__((visibility("hidden")))

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
    F_H_PROC_HW, F_H_LOG_LEN, F_H_UNLINK_N, F_H_CLASS0, F_B_STATE, F_B_NEXT,
    F_B_PREV, F_B_OWNER, F_S_USED, F_FREE, F_LIVE, F_RETIRED, F_LOG_RECORDS,
    F_F_FORTRAN, F_H_ENT_FREE, F_E_NEXT, F_H_NKEYS, F_WRITING, F_H_IDLE, F_S_SIZE,
    F_H_CACHE_BYTES, F_S_STAMP, F_S_SPILL, F_H_ENT_HW, F_H_ENT_BACKED,
    N_FIELDS
};

typedef struct {
    PyObject_HEAD
    Py_buffer buf;  /* the whole control segment; buf.obj NULL once released */
    int64_t *h, *ht, *bq, *sq;
    int64_t *log;   /* the undo journal: (index into the segment, old value) pairs */
    int64_t words;  /* int64 words in the segment */
    char *eb;
    int32_t *pins;
    int64_t mask, max_keys, max_blocks, max_segs, max_procs;
    int64_t f[N_FIELDS];
    int64_t class_sizes[256];  /* ix.CLASS_SIZES */
    int64_t n_classes;
    int64_t small_put;         /* write.SMALL_PUT */
    /* the arena's objects that never change (see bind()) */
    PyObject *meta, *ro_maps, *rw_maps, *refs, *view_dead;
    PyObject *dtypes;  /* dtype text -> numpy dtype, filled by layout.decode_dtype */
} Ctl;

typedef struct {
    PyObject *meta;  /* a reference of its own: other threads may change the dict */
    int64_t b, s, gen, off;
    int32_t *pin;    /* NULL for a value without a block */
} Found;

enum { GOT = 1, ABSENT = 0, DECLINED = -1, FAILED = -2 };

static inline int
ctl_live(Ctl *c)
{
    if (c->buf.obj == NULL) {
        PyErr_SetString(PyExc_ValueError, "the control segment was released");
        return 0;
    }
    return 1;
}

/* ctl_live, and Ctl.bind() called (the arena's dicts are at hand). */
static inline int
ctl_bound(Ctl *c)
{
    if (!ctl_live(c))
        return 0;
    if (c->meta == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Ctl.bind() was not called");
        return 0;
    }
    return 1;
}

static inline int
key_ok(Ctl *c, Py_ssize_t n)
{
    /* kbz is the key and its NUL: it must fit the key field of an entry */
    return n >= 2 && n <= c->f[F_E_DTYPE] - c->f[F_E_KEY];
}

/* Add delta to one count of this process's row of the pin table. Only this
 * process writes its row, and with the fast path on every change it makes to
 * it is one call of this (or of Ctl.pin_add from Python) while holding the
 * GIL, hence no read-modify-write of another thread can come in between. The
 * add is locked, which is also the full barrier a reader needs between its
 * pin and its check of the write counter. A count never goes below zero. */
static inline void
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

/* Tests only (polystore._shm.faults): count the steps of the write path and
 * SIGKILL this process at step fp_kill_at (0: off, -1: count only). */
FP_INTERNAL extern long fp_kill_at, fp_steps;

static inline void
fp_step(void)
{
    if (fp_kill_at && ++fp_steps == fp_kill_at)
        kill(getpid(), SIGKILL);
}

/* Tests only: called by get() between its pin and its check of the write
 * counter, the window in which a writer must send the reader to the lock. */
FP_INTERNAL extern PyObject *fp_test_hook;
FP_INTERNAL extern PyObject *fp_str_dtype;  /* "dtype", interned */
FP_INTERNAL extern PyObject *fp_str_C, *fp_str_F;  /* the orders "C" and "F", interned */

FP_INTERNAL int64_t fp_find(Ctl *c, const char *kbz, Py_ssize_t n, int64_t hash);
FP_INTERNAL int fp_item_of(PyObject *dict, int64_t key, PyObject **out);
FP_INTERNAL int fp_mapping_at(PyObject *maps, int64_t s, int64_t gen, PyObject **mm);
/* args: the key's bytes and NUL, its hash, the arena's epoch and pin row base */
FP_INTERNAL PyObject *fp_get_impl(Ctl *c, PyObject *const *args);
FP_INTERNAL int fp_watch(PyObject *refs, PyObject *callback, PyObject *base, int64_t b);
FP_INTERNAL PyObject *fp_view_impl(Ctl *c, PyObject *const *args);
FP_INTERNAL PyObject *fp_contains_impl(Ctl *c, PyObject *kbz, PyObject *hash);
/* _fastpath_write.c: a locked section in C. fp_begin_section takes the flock
 * without waiting (1 begun, 0 declined, -1 error); fp_end_section ends it;
 * fp_log_set is a journaled store; fp_guards_hold checks the keys that must
 * be absent and present; fp_pinned says whether a view pins block b. */
FP_INTERNAL int fp_begin_section(Ctl *c, int fd, int64_t epoch, int64_t *wseq);
FP_INTERNAL int fp_end_section(Ctl *c, int fd, int64_t wseq);
FP_INTERNAL void fp_log_set(Ctl *c, int64_t *p, int64_t v);
FP_INTERNAL int fp_guards_hold(Ctl *c, PyObject *absent, PyObject *present);
FP_INTERNAL int fp_pinned(Ctl *c, int64_t b);
/* *hash from a key's bytes and NUL and its hash as key_parts makes them: 1, or
 * 0 if they are not those of a key an entry can hold. */
FP_INTERNAL int fp_parse_key(Ctl *c, PyObject *kbz, PyObject *hash_obj, int64_t *hash);
/* The write entry points' args start with the arena's fd, epoch and slot. */
/* args: fd, epoch, slot, the key's bytes and NUL, its hash, the array, and the
 * key parts that must be absent and present (or NULL) */
FP_INTERNAL PyObject *fp_put_impl(Ctl *c, PyObject *const *args);
/* _fastpath_keys.c */
/* args: the arena's fd, epoch and slot, the key's bytes and NUL, its hash, the
 * block, its value's nbytes, dtype text, shape and flags */
FP_INTERNAL PyObject *fp_publish_impl(Ctl *c, PyObject *const *args);
/* args: the arena's fd, epoch and slot, the size class */
FP_INTERNAL PyObject *fp_take_impl(Ctl *c, PyObject *const *args);
/* args: fd, epoch, slot, a key's bytes and NUL and its hash, and its
 * companion's (or NULL, NULL) */
FP_INTERNAL PyObject *fp_remove_impl(Ctl *c, PyObject *const *args);

/* _fastpath_lock.c: the store's locks taken and dropped in one C call each */
FP_INTERNAL PyObject *fp_hold(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
FP_INTERNAL PyObject *fp_let_go(PyObject *module, PyObject *arena);
FP_INTERNAL PyObject *fp_fork_lock(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
FP_INTERNAL PyObject *fp_fork_unlock(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
FP_INTERNAL int fp_lock_init(PyObject *module);

#endif
