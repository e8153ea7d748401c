"""The shared-memory engine behind :class:`polystore.SharedArrayStore` (``polystore.shmstore``).

Layers, each using only those below it::

    polystore.shmstore      SharedArrayStore: the public API, keys, lifetime
    ───────────────────────────────────────────────────────────────────────────
    keys                    key parts (cached, shared with C) and the checks
                            of the store's arguments
    write   read   fork     the paths: put/grow/abandon; lock-free get, pins
                            and views; forking while views are held
    fast + _fastpath*.c     the common get, small put and create in C, and the
                            taking and dropping of the lock (optional)
    ───────────────────────────────────────────────────────────────────────────
    arena                   one process's view of a store: mappings, the lock
                            (`with arena.locked:` is a transaction), recovery
                            after a dead holder, process rows and pins
    open                    creating and attaching to a control segment
    alloc                   blocks, size classes, free lists, segments,
                            reaping dead processes, reserving memory
    tables                  typed views of the control segment, the undo
                            journal, the key index (hash table and entries)
    layout                  file names, header slots, record fields, sizes
    ───────────────────────────────────────────────────────────────────────────
    check                   a full consistency check (tests, diagnosis)
    faults                  test-only: kill the process at step N of a write

The invariants, and where each is kept:

* *A locked section is all or nothing* (``tables``): every change to shared
  state is journaled before it is made; a holder that dies is rolled back by
  the next one, which also finishes the unlinks it committed (``arena``).
* *No exception leaves the lock taken* (``arena``, ``fork``, and the C
  ``Section``, ``hold``, ``let_go``, ``fork_lock`` and ``fork_unlock``): a
  signal handler that raises mid-section (Ctrl-C), or in a fork hook, ends it
  as a crash would, and the lock is let go of in every case.
* *A key is old or new, never a mix* (``write``): array bytes are written only
  into blocks no key names; a new description goes into a fresh entry.
* *A block has one owner* (``alloc``): FREE on one free list, WRITING for one
  process, LIVE for one key, RETIRED while pinned, RESERVED while its segment
  is created; reused only when no process pins it.
* *Every page is reserved before it is touched* (``alloc``, ``open``): a full
  file system is ``ShmFullError``, never SIGBUS.
* *Readers see a committed state or retry* (``read``): the seqlock counter is
  odd while anyone holds the lock, including one that died.
"""
