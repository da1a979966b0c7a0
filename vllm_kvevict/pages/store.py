"""Host copies of pages and their digests, by host page id."""
from __future__ import annotations

from typing import Sequence

import torch

from vllm_kvevict.algorithms.digest import digest_dtype
from vllm_kvevict.pages.formats import BlockFormat
from vllm_kvevict.pages.memory import huge_page_empty


class HostStoreFull(RuntimeError):
    """The host store has no free page (the scheduler's reservation should prevent this)."""


class HostPageStore:
    """Host copies of pages (all layers) and their device-side digests, by host page id.

    One host page id names a logical page of one request in every layer. Ids are handed out
    before the tensors exist (the scheduler plans a step before any layer runs); :meth:`bind`
    allocates them from the first layer's KV cache. On CUDA the host tensors are pinned, so
    copies to and from them are asynchronous.
    """

    def __init__(self, num_pages: int, num_layers: int):
        self.num_pages = num_pages
        self.num_layers = num_layers
        self.pages: list[torch.Tensor] = []
        self.digests: list[torch.Tensor] = []
        self.page_bytes = 0
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def bound(self) -> bool:
        return bool(self.digests)

    def bind(self, kv_cache: torch.Tensor, block_format: "BlockFormat", num_kv_heads: int,
             head_dim: int) -> None:
        """Allocate the host pages and digests (idempotent).

        A store of 0 pages keeps no copies: its digests are indexed by KV-cache block instead
        (policies that keep every page resident).
        """
        if self.bound:
            return
        device = kv_cache.device
        shape = block_format.page_shape(kv_cache)
        # Pinned (CUDA) host memory is page-locked, so committed, as soon as it is allocated;
        # unpinned memory (CPU) stays uncommitted until a page is first written. On the CPU the
        # digests, read cold by every layer's selection, live on huge pages; the host pages do
        # not (faulting them in 2 MiB at a time slows the backups more than it speeds recalls).
        on_cpu, pin = device.type == "cpu", device.type == "cuda"
        self.pages = [torch.empty((self.num_pages, *shape), dtype=kv_cache.dtype, pin_memory=pin)
                      for _ in range(self.num_layers)] if self.num_pages else []
        slots = self.num_pages or kv_cache.shape[0]
        digest_shape, dtype = (slots, 2, num_kv_heads, head_dim), digest_dtype(kv_cache.dtype)
        self.digests = [huge_page_empty(digest_shape, dtype) if on_cpu
                        else torch.empty(digest_shape, dtype=dtype, device=device)
                        for _ in range(self.num_layers)]
        page_numel = 1
        for n in shape:
            page_numel *= n
        self.page_bytes = self.num_layers * page_numel * kv_cache.element_size()

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise HostStoreFull(f"vllm-kvevict: host page store full ({self.num_pages} pages)")
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def release(self, host_ids: Sequence[int]) -> None:
        self._free.extend(host_ids)
