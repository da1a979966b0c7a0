"""The page runtime's per-layer tensor work behind one interface: torch or Triton.

:class:`PageOps` (torch) runs on any device and is what CPU workers use; :class:`TritonPageOps`
implements the same calls with the kernels of :mod:`vllm_kvevict.kernels` and is what CUDA
workers use. Neither synchronises with the host except where :attr:`PageOps.host_sync_free` says
a sync is free (CPU), where the torch calls may skip work that turns out empty. Tests run the
Triton one through Triton's interpreter on CPU tensors and compare it with the torch one.
"""
from __future__ import annotations

import torch

from vllm_kvevict.algorithms.digest import page_digests, score_packed_pages
from vllm_kvevict.pages.formats import BlockFormat


class PageOps:
    """Torch implementations (every device; syncs only where :attr:`host_sync_free`)."""

    def __init__(self, host_sync_free: bool = True) -> None:
        # True on CPU: reading a tensor's value costs nothing, so empty work may be skipped.
        self.host_sync_free = host_sync_free

    def score(self, policy, query: torch.Tensor, digests: torch.Tensor, host_ids: torch.Tensor,
              num_pages: torch.Tensor) -> torch.Tensor:
        """``[R, P]`` scores of each row's pages ``host_ids`` (digest slots) for its query
        ``[R, heads, head_dim]``; entries past ``num_pages[r]`` are unspecified."""
        rows, num_pages = host_ids.shape
        box = digests.index_select(0, host_ids.flatten()).unflatten(0, (rows, num_pages))
        if policy.digest_bound_score:
            return score_packed_pages(query, box)
        return policy.score(query, box[:, :, 0], box[:, :, 1])

    def backup(self, kv_cache: torch.Tensor, block_format: BlockFormat, blocks: torch.Tensor,
               slots: torch.Tensor, digests: torch.Tensor, host_pages: torch.Tensor | None,
               digest_kind: str) -> None:
        """Digest the full pages in ``blocks`` into ``digests[slots]``; copy them to
        ``host_pages[slots]`` unless ``host_pages`` is None."""
        pages = block_format.read(kv_cache, blocks)
        hi, lo = page_digests(block_format.keys(pages), digest_kind)
        digests.index_copy_(0, slots, torch.stack([hi, lo], dim=1))
        if host_pages is not None:
            host_pages.index_copy_(0, slots.to(host_pages.device), pages.to(host_pages.device))

    def copy_pages(self, src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor,
                   dst_ids: torch.Tensor, valid: torch.Tensor) -> None:
        """Page ``src_ids[i]`` of ``src`` over page ``dst_ids[i]`` of ``dst`` where ``valid[i]``
        (page tensors: a layer's KV cache or the host store, pages on dimension 0)."""
        from vllm_kvevict.kernels.transfer import copy_pages_reference

        copy_pages_reference(src, src_ids, dst, dst_ids, valid)


class TritonPageOps(PageOps):
    """The kernels (CUDA; Triton's interpreter on CPU tensors), for vLLM's FlashAttention layout
    (:class:`~vllm_kvevict.pages.formats.FlashBlockFormat`). No host sync in any call: host
    pages are addressed in place (pinned, unified addressing) and copies are masked."""

    def __init__(self) -> None:
        super().__init__(host_sync_free=False)
        self._views: dict[int, torch.Tensor] = {}

    def score(self, policy, query, digests, host_ids, num_pages):
        from vllm_kvevict.kernels.scoring import score_batch

        if not policy.digest_bound_score:
            return super().score(policy, query, digests, host_ids, num_pages)
        return score_batch(query.contiguous(), digests[:, 0], digests[:, 1],
                           host_ids.contiguous(), num_pages, 0, 0)

    def backup(self, kv_cache, block_format, blocks, slots, digests, host_pages, digest_kind):
        from vllm_kvevict.kernels.digest import build_digests

        hi, lo = build_digests(block_format.key_cache(kv_cache), blocks, digest_kind)
        digests.index_copy_(0, slots, torch.stack([hi, lo], dim=1))
        if host_pages is not None:
            self.copy_pages(kv_cache, blocks, host_pages, slots,
                            torch.ones_like(blocks, dtype=torch.bool))

    def copy_pages(self, src, src_ids, dst, dst_ids, valid):
        from vllm_kvevict.kernels.transfer import copy_pages

        device = src_ids.device
        copy_pages(self._view(src, device), src_ids, self._view(dst, device), dst_ids, valid,
                   device)

    def _view(self, pages: torch.Tensor, device: torch.device) -> torch.Tensor:
        if pages.device == device:
            return pages
        from vllm_kvevict.kernels.transfer import host_view

        key = pages.data_ptr()
        if key not in self._views:
            self._views[key] = host_view(pages, device)
        return self._views[key]


def page_ops_for(device: torch.device | str) -> PageOps:
    """The ops a worker on ``device`` runs: the kernels on CUDA, torch elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return TritonPageOps()
    return PageOps(host_sync_free=device.type == "cpu")
