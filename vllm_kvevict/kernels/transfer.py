"""Batched page copies between the host store and the device KV cache.

One copy per direction and layer per step: host pages are gathered into a pinned staging buffer,
copied in one transfer on a side stream, and scattered into their blocks there. Invariants:

* a layer's attention reads its cache only after :meth:`PageTransfer.wait` for that layer (the
  compute stream waits on the layer's last copy event, not on other layers' copies);
* a recall of a layer sees every backup queued before it for that layer (pending backups of the
  layer are finished first);
* a staging buffer is reused only after the copy that read or wrote it has completed.

On CPU tensors (no streams) the same calls copy synchronously.
"""
from __future__ import annotations

import torch

from vllm_kvevict.pages import BlockFormat


class PageTransfer:
    def __init__(self, block_format: BlockFormat, num_layers: int) -> None:
        self.format = block_format
        self.num_layers = num_layers
        self._stream = None
        self._ready: list = [None] * num_layers        # last copy event per layer
        self._staging: dict[tuple[str, int], torch.Tensor] = {}
        self._staging_free: dict[tuple[str, int], object] = {}
        self._pending: list[list[tuple]] = [[] for _ in range(num_layers)]

    def recall(self, layer: int, kv_cache: torch.Tensor, blocks: torch.Tensor,
               host_pages: torch.Tensor, host_ids: torch.Tensor) -> None:
        """Copy host pages ``host_ids`` of ``layer`` into ``blocks`` of ``kv_cache``."""
        if not blocks.numel():
            return
        self.finish_backups(layer)
        if kv_cache.device.type != "cuda":
            self.format.write(kv_cache, blocks, host_pages.index_select(0, host_ids.cpu()))
            return
        staging = self._buffer("recall", layer, host_pages, blocks.numel())
        torch.index_select(host_pages, 0, host_ids.cpu(), out=staging)
        stream = self._side_stream(kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream(kv_cache.device))  # blocks free to overwrite
        with torch.cuda.stream(stream):
            self.format.write(kv_cache, blocks, staging.to(kv_cache.device, non_blocking=True))
            self._ready[layer] = self._record(("recall", layer), stream)

    def backup(self, layer: int, kv_cache: torch.Tensor, blocks: torch.Tensor,
               host_pages: torch.Tensor, host_ids: torch.Tensor) -> None:
        """Queue copies of ``blocks`` into host pages ``host_ids`` of ``layer``; they land
        by :meth:`finish_backups` (called by the next recall of the layer at the latest)."""
        if not blocks.numel():
            return
        if kv_cache.device.type != "cuda":
            host_pages.index_copy_(0, host_ids.cpu(), self.format.read(kv_cache, blocks))
            return
        staging = self._buffer("backup", layer, host_pages, blocks.numel())
        stream = self._side_stream(kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream(kv_cache.device))  # pages written
        with torch.cuda.stream(stream):
            staging.copy_(self.format.read(kv_cache, blocks), non_blocking=True)
            event = self._record(("backup", layer), stream)
        self._pending[layer].append((event, staging, host_pages, host_ids.cpu()))

    def finish_backups(self, layer: int) -> None:
        for event, staging, host_pages, host_ids in self._pending[layer]:
            event.synchronize()
            host_pages.index_copy_(0, host_ids, staging)
        self._pending[layer].clear()

    def wait(self, layer: int, device: torch.device) -> None:
        """Make ``device``'s current stream wait for ``layer``'s copies."""
        if self._ready[layer] is not None:
            torch.cuda.current_stream(device).wait_event(self._ready[layer])

    def _side_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _record(self, key, stream):
        event = torch.cuda.Event()
        event.record(stream)
        self._staging_free[key] = event
        return event

    def _buffer(self, kind: str, layer: int, host_pages: torch.Tensor, n: int) -> torch.Tensor:
        """A pinned ``[n, *page]`` staging buffer, grown as needed, free of earlier copies."""
        key = (kind, layer)
        busy = self._staging_free.pop(key, None)
        if busy is not None:
            busy.synchronize()
        buffer = self._staging.get(key)
        if kind == "backup" and self._pending[layer]:
            buffer = None  # still to be scattered: take a fresh one
        if buffer is None or buffer.shape[0] < n:
            buffer = torch.empty((max(n, 16), *host_pages.shape[1:]), dtype=host_pages.dtype,
                                 pin_memory=True)
            self._staging[key] = buffer
        return buffer[:n]
