"""A full consistency check of a store's control segment, against its files too.

:func:`problems` takes the store lock (so a dead holder's half-done section
is rolled back first, as for any other lock holder) and lists every broken
invariant it finds, in words. The crash tests run it after each kill; it is
also what to run on a store one suspects. An empty list means:

* the journal is empty and no unlink is pending;
* every slot of the hash table names a distinct entry whose key hashes to the
  slot's hash and can be found from its home slot; their number is ``H_NKEYS``;
* free entries form one list without cycles, disjoint from the live ones,
  and together they are every entry handed out;
* every key's block is LIVE, big enough, and named by that key alone; every
  LIVE block is named by a key;
* every FREE block is on exactly one free list, that of its class, with
  consistent back links; unused descriptors are on their own list;
* every block lies inside a segment of its class that is live (or being
  created, for a RESERVED one), and each segment's use count is the number
  of its blocks in use;
* ``H_TOTAL`` and ``H_IDLE`` are the sizes of the live and of the idle
  segments, and every live segment has its file, of its size, and no other
  data segment file of the store exists (but for one being created).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from . import layout as ix

if TYPE_CHECKING:
    from .arena import Arena

__all__ = ["problems"]

_EQ = ix.ENT_SIZE // 8
_IN_USE = (ix.LIVE, ix.WRITING, ix.RETIRED)


def problems(a: Arena) -> list[str]:
    """Every broken invariant of the store behind arena ``a`` (empty: consistent)."""
    with a.locked:
        out: list[str] = []
        if a.h[ix.H_LOG_LEN] or a.h[ix.H_UNLINK_N]:
            out.append("the journal or the unlink list is not empty under the lock")
        blocks = _check_index(a, out)
        _check_blocks(a, blocks, out)
        _check_segments(a, out)
        return out


def _check_index(a: Arena, out: list[str]) -> dict[int, int]:
    """Check hash table and entries; return {block: entry} of the keys' blocks."""
    hw = a.h[ix.H_ENT_HW]
    live: dict[int, int] = {}
    for i in range(a.layout.ht_cap):
        v = a.ht[i]
        if v == 0:
            continue
        e = (v & 0xFFFFFFFF) - 1
        if not 0 <= e < hw:
            out.append(f"slot {i} names entry {e}, outside [0, {hw})")
            continue
        if e in live:
            out.append(f"entry {e} is named by slots {live[e]} and {i}")
            continue
        live[e] = i
        key = a.key_of(e)
        kb = key.encode("utf-8", "surrogatepass")
        if a.ht_hash(kb) != v >> 32:
            out.append(f"slot {i}: the hash of key {key!r} is not the slot's")
        elif a.find(kb + b"\0", v >> 32) != (i, e):
            out.append(f"key {key!r} in slot {i} cannot be found from its home slot")
    if len(live) != a.h[ix.H_NKEYS]:
        out.append(f"{len(live)} keys in the hash table, H_NKEYS says {a.h[ix.H_NKEYS]}")
    free: set[int] = set()
    e = a.h[ix.H_ENT_FREE]
    while e >= 0 and e not in free and len(free) <= hw:
        if e >= hw or e in live:
            out.append(f"free entry list holds entry {e}, which is out of range or in use")
            break
        free.add(e)
        e = a.eq[e * _EQ + ix.E_NEXT]
    else:
        if e >= 0:
            out.append(f"the free entry list runs in a cycle through entry {e}")
    if len(free) + len(live) != hw:
        out.append(f"{len(live)} live and {len(free)} free entries, but {hw} handed out")
    blocks: dict[int, int] = {}
    for e in live:
        b = a.eq[e * _EQ + ix.E_BLOCK]
        if b < 0:
            continue
        if b in blocks:
            out.append(f"block {b} holds the values of entries {blocks[b]} and {e}")
        blocks[b] = e
        k = b * ix.BLK_FIELDS
        if not 0 <= b < a.h[ix.H_BLK_HW] or a.bq[k + ix.B_STATE] != ix.LIVE:
            out.append(f"entry {e} ({a.key_of(e)!r}) names block {b}, which is not LIVE")
        elif a.eq[e * _EQ + ix.E_NBYTES] > ix.CLASS_SIZES[a.bq[k + ix.B_CLS]]:
            out.append(f"entry {e} holds more bytes than its block {b}")
    return blocks


def _check_blocks(a: Arena, named: dict[int, int], out: list[str]) -> None:
    hw = a.h[ix.H_BLK_HW]
    blk = a.blk_np[:hw]
    on_list: dict[int, int] = {}
    for c in range(ix.N_CLASSES):
        b, prev = a.h[ix.H_CLASS0 + c], -1
        while b >= 0:
            if b >= hw or b in on_list:
                out.append(f"free list of class {c} reaches block {b} twice or out of range")
                break
            on_list[b] = c
            if blk[b, ix.B_STATE] != ix.FREE or blk[b, ix.B_CLS] != c:
                out.append(f"block {b} on the free list of class {c} is not a FREE block of it")
            if blk[b, ix.B_PREV] != prev:
                out.append(f"block {b}: back link {blk[b, ix.B_PREV]}, expected {prev}")
            prev, b = b, blk[b, ix.B_NEXT]
    unused: set[int] = set()
    d = a.h[ix.H_BLK_FREE]
    while d >= 0:
        if d >= hw or d in unused:
            out.append(f"the descriptor list reaches {d} twice or out of range")
            break
        unused.add(d)
        if blk[d, ix.B_STATE] != ix.UNUSED:
            out.append(f"descriptor {d} is on the unused list but not UNUSED")
        d = blk[d, ix.B_NEXT]
    for b in range(hw):
        state, s = int(blk[b, ix.B_STATE]), int(blk[b, ix.B_SEG])
        if state == ix.FREE and b not in on_list:
            out.append(f"FREE block {b} is on no free list")
        elif state == ix.LIVE and b not in named:
            out.append(f"LIVE block {b} is named by no key")
        elif state == ix.UNUSED and b not in unused:
            out.append(f"UNUSED descriptor {b} is lost (on no list)")
        elif state == ix.WRITING and a.proc_np[blk[b, ix.B_OWNER], ix.P_PID] == 0:
            out.append(f"WRITING block {b} belongs to no process")
        if state == ix.UNUSED:
            continue
        k = s * ix.SEG_FIELDS
        seg_state = a.sq[k + ix.S_STATE] if 0 <= s < a.layout.max_segs else -1
        want = ix.SEG_CREATING if state == ix.RESERVED else ix.SEG_LIVE
        if seg_state != want:
            out.append(f"block {b} ({state=}) lies in segment {s} of state {seg_state}")
        elif a.sq[k + ix.S_CLS] != blk[b, ix.B_CLS] or not (
            0 <= blk[b, ix.B_OFF] <= a.sq[k + ix.S_SIZE] - ix.CLASS_SIZES[blk[b, ix.B_CLS]]
        ):
            out.append(f"block {b} does not fit segment {s}")


def _check_segments(a: Arena, out: list[str]) -> None:
    blk = a.blk_np[: a.h[ix.H_BLK_HW]]
    total = spilled = idle = 0
    expected: set[str] = set()
    creating: set[str] = set()
    for s in range(a.layout.max_segs):
        k = s * ix.SEG_FIELDS
        state, size, gen = a.sq[k + ix.S_STATE], a.sq[k + ix.S_SIZE], a.sq[k + ix.S_GEN]
        if state == ix.SEG_EMPTY:
            continue
        if a.sq[k + ix.S_SPILL]:
            spilled += size
        else:
            total += size
        path = a.seg_file(s, gen)
        if state == ix.SEG_CREATING:
            creating.add(path)
            continue
        used = int(((blk[:, ix.B_SEG] == s) & np.isin(blk[:, ix.B_STATE], _IN_USE)).sum())
        if used != a.sq[k + ix.S_USED]:
            out.append(f"segment {s}: {used} blocks in use, S_USED says {a.sq[k + ix.S_USED]}")
        if used == 0:
            idle += size
        expected.add(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(f"segment {s}: its file {path} is missing")
            continue
        if st.st_size != size:
            out.append(f"segment {s}: file of {st.st_size} bytes, expected {size}")
    for slot, found in ((ix.H_TOTAL, total), (ix.H_SPILLED, spilled), (ix.H_IDLE, idle)):
        if found != a.h[slot]:
            out.append(f"segments add up to {found} bytes, header slot {slot} says {a.h[slot]}")
    prefix = f"{ix.PREFIX}{a.owner_pid}-{a.name}."
    for directory in {a.dir, a.spill_dir or a.dir}:
        for name in os.listdir(directory):
            parsed = ix.parse_filename(name)
            path = os.path.join(directory, name)
            orphan = path not in expected and path not in creating
            if name.startswith(prefix) and parsed and not parsed[2] and orphan:
                out.append(f"data segment file {path} belongs to no segment")
