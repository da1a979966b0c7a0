"""Host tensors on transparent huge pages.

The page runtime reads a layer's digests once per step, after the forward has streamed the
weights through the caches: the reads are cold, and on 4 KiB pages many of them also miss the
TLB (a step touches a few hundred MiB). Linux backs anonymous memory advised with
``MADV_HUGEPAGE`` by 2 MiB pages when it is first written (``enabled`` set to ``always`` or
``madvise``), with one TLB entry for 512 of the small ones. Elsewhere the tensors are
ordinary.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's ``madvise`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, starting at a huge-page boundary and
    advised to be backed by huge pages (tensors under one huge page, or where the advice is
    unavailable or refused, are plain ``torch.empty``). Must be called before the memory is
    first written: the advice applies to pages not yet committed."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE_BYTES
    if madvise(raw.data_ptr() + start, nbytes, MADV_HUGEPAGE) != 0:
        return torch.empty(shape, dtype=dtype)
    return raw[start:start + nbytes].view(dtype).view(shape)
