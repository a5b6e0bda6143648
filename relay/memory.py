"""Give freed memory back to the system.

:func:`trim` hands the heap's free pages back (glibc's ``malloc_trim``): the receiver's
sweep calls it once a burst of large bodies has been let go. And glibc's allocator
serves a large block (a webhook body of a few hundred KB, joined from its chunks) by
``mmap`` and returns it on free — until the first such free, after which it raises its
mmap threshold (up to 32 MiB) and serves later large blocks from the heap, where they
stay once freed: a burst of large bodies left the process 1 GB bigger for good. Fixing
the threshold (``mallopt(M_MMAP_THRESHOLD, …)``, which also turns off that adjustment)
keeps large blocks on ``mmap``. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value


@functools.cache
def _libc_function(name: str) -> Any:
    """A C library function of this process, looked up once (``None``: not there)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def keep_large_blocks_returnable() -> bool:
    """Fix glibc's mmap threshold; whether it could be."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Give the heap's free pages back to the system; whether anything was."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
