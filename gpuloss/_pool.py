"""Reuse of large output buffers on the CPU.

A fresh multi-megabyte array costs the kernel a page fault and a page of zeros for every
4 KiB (or 2 MiB) it touches: for a 64 MB gradient that is about as long as reading the inputs.
A training loop asks for a gradient of the same size again and again, so the buffers of
gradients the caller has dropped are kept (up to GPULOSS_POOL_BYTES, default 1 GiB; 0
disables) and handed out again, already mapped.

A buffer is reused only when nothing refers to it any more: every NumPy view of an array,
however derived, holds a reference to the array that owns the memory (NumPy collapses `.base`
to the owner), so the owner's reference count says whether any view is alive.

Large buffers start on a 64-byte boundary (malloc gives 16): XLA's CPU client takes such a
buffer through DLPack without copying, which is how results reach JAX (`gpuloss._dispatch`);
a copy of an unaligned 256 MB gradient into JAX costs more than computing it.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np

MIN_BYTES = 1 << 20  # below this, malloc is cheap and the pool would only hold memory
ALIGN = 64  # bytes
_lock = threading.Lock()
_owners: list[np.ndarray] = []  # uint8 arrays owned by the pool


# The liveness test reads CPython reference counts; elsewhere (PyPy, free-threaded builds,
# where counts are deferred or split between threads) the pool stays off.
_COUNTS_ARE_EXACT = sys.implementation.name == "cpython" and getattr(
    sys, "_is_gil_enabled", lambda: True
)()


_forked = False  # whether this process was forked from the one that imported gpuloss


def _mark_forked() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # (at import: a fork before the first call counts too)
    os.register_at_fork(after_in_child=_mark_forked)


def forked() -> bool:
    """Whether this process is a fork of the one that imported gpuloss: there an OpenMP team
    that the parent started may wait forever for threads that do not exist (GNU's does)."""
    return _forked


def cpu_threads() -> int:
    """Threads the CPU backends may use: GPULOSS_NUM_THREADS, else the CPUs this process may
    run on. (Here beside the buffers: both CPU backends import this module, and no backend
    imports another.)"""
    env = os.environ.get("GPULOSS_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _limit() -> int:
    if not _COUNTS_ARE_EXACT:
        return 0
    return int(os.environ.get("GPULOSS_POOL_BYTES", 1 << 30))


def _is_free(i: int) -> bool:
    """Whether only the pool refers to _owners[i] (the list and getrefcount's argument)."""
    return sys.getrefcount(_owners[i]) <= 2


def empty(shape, dtype, order="C") -> np.ndarray:
    """Like np.empty, but large arrays reuse the memory of dropped ones."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape if isinstance(shape, (tuple, list)) else (shape,)) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype, order=order)
    limit = _limit()
    if nbytes > limit:
        owner = np.empty(nbytes + ALIGN, np.uint8)
    else:
        with _lock:
            owner = None
            for i in range(len(_owners)):
                if _owners[i].nbytes == nbytes + ALIGN and _is_free(i):
                    owner = _owners[i]
                    break
            if owner is None:
                owner = np.empty(nbytes + ALIGN, np.uint8)
                _owners.append(owner)
                _trim(limit)
    start = -owner.ctypes.data % ALIGN
    flat = owner[start : start + nbytes].view(dtype)
    if order == "F":
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _trim(limit: int) -> None:
    """Forget free buffers, oldest first, while the pool holds more than `limit` bytes."""
    total = sum(o.nbytes for o in _owners)
    i = 0
    while total > limit and i < len(_owners):
        if _is_free(i):
            total -= _owners[i].nbytes
            del _owners[i]
        else:
            i += 1


def clear() -> None:
    """Drop every free buffer (the ones in use stay with their arrays)."""
    with _lock:
        for i in reversed(range(len(_owners))):
            if _is_free(i):
                del _owners[i]
