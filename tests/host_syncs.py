"""Counting what would make the host wait for an accelerator, on CPU tensors.

:class:`HostSyncCounter` records the operations that read a device tensor's values on the host
(``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``nonzero``, boolean-mask indexing, ...):
on CUDA each one waits for the stream. Kernel launches are opaque on CUDA, so what Triton's
interpreter does inside a launch is not counted (:meth:`HostSyncCounter.install`).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output size or value depends on tensor data: the host must wait for it.
SYNCING_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_static",
               "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
               "argwhere"}
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
METHODS = ("cpu", "tolist", "numpy")  # host reads that never reach the dispatcher on CPU


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostSyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            if name in SYNCING_OPS or (name in INDEXING_OPS and _has_bool_index(args)):
                self.events.append(name)
            elif name == "repeat_interleave" and (kwargs or {}).get("output_size") is None:
                self.events.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def install(self, monkeypatch):
        """Count inside the block: the mode, the tensor methods, kernel launches left out."""
        from vllm_kvevict.kernels import launch

        for method in METHODS:
            original = getattr(torch.Tensor, method)

            def counted(tensor, *args, _original=original, _name=method, **kwargs):
                if not self.paused:
                    self.events.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, method, counted)
        original_getitem = launch._Interpreted.__getitem__

        def uncounted_launch(kernel, grid):
            run = original_getitem(kernel, grid)

            def launch_paused(*args, **kwargs):
                paused, self.paused = self.paused, True
                try:
                    return run(*args, **kwargs)
                finally:
                    self.paused = paused

            return launch_paused

        monkeypatch.setattr(launch._Interpreted, "__getitem__", uncounted_launch)
        with self:
            yield self

    def take(self) -> list[str]:
        events, self.events = self.events, []
        return events
