"""Work-arounds for vLLM 0.32 defects the plugin would otherwise trip over.

* A CPU worker, when it starts, rebinds Triton kernels by scanning every object of every loaded
  module (``vllm.triton_utils.dispatcher._rebind_kernels``) and calls ``vars(obj).get``, which
  fails on llvmlite's FFI library object (its ``__dict__`` is a wrapped C function). llvmlite is
  loaded once the plugin's compiled CPU kernels (numba) have run, so a second engine started in the
  same process, or one forked from it, would fail to start. The scan is run with numba and
  llvmlite hidden: they hold no Triton kernel.
"""
from __future__ import annotations

import sys

from vllm_kvevict.engine.patching import wrap_method

HIDDEN_FROM_KERNEL_SCAN = ("llvmlite", "numba")


def install() -> None:
    from vllm.triton_utils import dispatcher

    wrap_method(dispatcher, "_rebind_kernels", _scan_without_compilers)


def _scan_without_compilers(original, *args, **kwargs):
    hidden = {name: module for name, module in list(sys.modules.items())
              if name.split(".")[0] in HIDDEN_FROM_KERNEL_SCAN}
    for name in hidden:
        del sys.modules[name]
    try:
        return original(*args, **kwargs)
    finally:
        sys.modules.update(hidden)
