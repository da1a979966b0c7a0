"""One kernel body, two launchers: Triton-compiled for CUDA tensors, interpreted for CPU ones."""
from __future__ import annotations

import contextlib

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


class Kernel:
    """``Kernel(fn).on(device)[grid](*args)`` launches ``fn`` like ``triton.jit(fn)[grid]``.

    CPU tensors go through Triton's interpreter (slow, for tests and smoke runs); it reads
    bfloat16/float16 correctly only through an explicit ``.to(tl.float32)``, so every kernel
    upcasts right after loading (exact for tf32 dots: both formats fit its mantissa).
    """

    def __init__(self, fn) -> None:
        self.compiled = triton.jit(fn)
        self.interpreted = _Interpreted(fn)

    def on(self, device: torch.device):
        return self.compiled if device.type == "cuda" else self.interpreted


class _Interpreted:
    def __init__(self, fn) -> None:
        self.fn = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _library_calls_interpreted():
                return self.fn[grid](*args, **kwargs)

        return launch


@contextlib.contextmanager
def _library_calls_interpreted():
    """Triton's own ``@jit`` helpers (``tl.zeros``, ``tl.sum``, ...) were compiled-mode objects
    at import; route their calls through the interpreter while a CPU launch runs."""
    original = JITFunction.__call__
    interpreted: dict = {}

    def call(self, *args, **kwargs):
        if self.fn not in interpreted:
            interpreted[self.fn] = InterpretedFunction(self.fn)
        return interpreted[self.fn](*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def power_of_two(n: int) -> int:
    return triton.next_power_of_2(max(1, n))
