"""The page runtime's per-layer work behind one interface: torch, compiled CPU code, Triton.

:class:`PageOps` (torch) runs on any device and is the reference. :class:`CompiledCPUPageOps`
(CPU workers) does each layer's work as one compiled call for all rows
(:mod:`vllm_kvevict.kernels.cpu`); :class:`TritonPageOps` (CUDA workers) uses the Triton kernels
of :mod:`vllm_kvevict.kernels`. None synchronises with the host except where
:attr:`PageOps.host_sync_free` says a sync is free (CPU), where empty work may be skipped. Tests
compare each with the torch one through the runtime (Triton through its interpreter on CPU).
"""
from __future__ import annotations

import importlib.util

import torch

from vllm_kvevict.algorithms.attention_stats import (EVEN_SHARE_MARGIN, LAST, LAST_ATTENDED,
                                                     NUM_SUMS, attended, latest_use,
                                                     page_mass_from_logits)
from vllm_kvevict.algorithms.digest import page_digests, score_packed_pages, stored_digests
from vllm_kvevict.algorithms.selection import keep_mask
from vllm_kvevict.pages.formats import BlockFormat
from vllm_kvevict.pages.plan import SelectionBatch
from vllm_kvevict.paging import INT_OF_WIDTH


# The float types the compiled CPU kernels read (bfloat16 as the upper halves of float32 bits).
COMPILED_FLOATS = (torch.bfloat16, torch.float32)


class PageOps:
    """Torch implementations (every device; syncs only where :attr:`host_sync_free`)."""

    def __init__(self, host_sync_free: bool = True) -> None:
        # True on CPU: reading a tensor's value costs nothing, so empty work may be skipped.
        self.host_sync_free = host_sync_free

    def score(self, policy, query: torch.Tensor, digests: torch.Tensor,
              batch: SelectionBatch) -> torch.Tensor:
        """``[rows, P]`` scores of each selection row's pages (digest slots ``host_ids``) for its
        query (:meth:`SelectionBatch.queries`): over all KV heads, or, with one placement per
        KV head, over the row's head; entries past ``num_full`` are unspecified."""
        host_ids = batch.host_ids
        if batch.heads == 1:
            rows, num_pages = host_ids.shape
            box = digests.index_select(0, host_ids.flatten()).unflatten(0, (rows, num_pages))
        else:  # [rows, P, 2, 1, head_dim]: the row's KV head only
            box = digests[host_ids, :, batch.head_of_row[:, None]].unsqueeze(3)
        if policy.digest_bound_score:
            return score_packed_pages(query, box)
        return policy.score(query, box[:, :, 0], box[:, :, 1])

    def select(self, policy, query: torch.Tensor, digests: torch.Tensor, batch: SelectionBatch,
               layer: int, kv_cache: torch.Tensor, source: torch.Tensor | None,
               from_host: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """One layer's selection for every row of ``batch``: scores, the keep mask (the
        layer's pinned pages, then the best-scored) and, unless ``source`` is None, the kept
        pages made resident (:meth:`place_kept`, updating ``batch.held[layer]``). Returns
        ``(keep [R, P], scores [R, P], pages moved)``, valid until the next layer's call;
        ``query`` is the layer's ``[tokens, q_heads, head_dim]``; ``R`` counts selection rows."""
        held, pinned = batch.held[layer], batch.pinned[layer]
        scores = self.score(policy, batch.queries(query), digests, batch)
        keep = keep_mask(scores, batch.valid, pinned, batch.num_keep)
        moved = 0
        if source is not None:
            moved = self.place_kept(batch, held, keep, scores, kv_cache, source, from_host)
        return keep, scores, moved

    def place_kept(self, batch: SelectionBatch, held: torch.Tensor, keep: torch.Tensor,
                   scores: torch.Tensor, kv_cache: torch.Tensor, source: torch.Tensor,
                   from_host: bool) -> torch.Tensor | int:
        """Make every kept page resident in a candidate column of its row: kept pages that no
        candidate holds go, in ascending page order, over the candidates holding the
        lowest-scored pages not kept (ties: the lower column). Their content comes from the
        host store ``source``, or, at a prompt's end (``from_host=False``, ``source`` the KV
        cache), from the page's own block (page ``p`` is then held by column ``p``: nothing was
        evicted yet). With one placement per KV head, only the row's head of each page moves.
        All rows in one masked copy; returns the (head) pages moved."""
        num_pages = keep.shape[1]
        candidates = batch.candidates
        keep_padded = torch.nn.functional.pad(keep, (0, 1))  # page P: no page
        in_place = torch.zeros_like(keep_padded).scatter_(
            1, torch.where(candidates, held, num_pages), True)[:, :num_pages]
        missing = keep & ~in_place
        if self.host_sync_free and not missing.any():  # most steps and layers
            return 0
        held_kept = keep_padded.gather(1, held) & candidates
        victims = candidates & ~held_kept
        victim_scores = torch.nn.functional.pad(scores.float(), (0, 1)).gather(1, held)
        victim_scores = victim_scores.masked_fill(~victims, float("inf"))
        width = min(num_pages, held.shape[1])
        cols = torch.argsort(victim_scores, dim=1, stable=True)[:, :width]  # distinct per row
        pages = torch.argsort((~missing).to(torch.uint8), dim=1, stable=True)[:, :width]
        pairs = torch.arange(width, device=keep.device) < missing.sum(1, keepdim=True)
        sources = (batch.host_ids if from_host else batch.blocks).gather(1, pages)
        heads = None if batch.heads == 1 else batch.head_of_row[:, None].expand_as(pairs)
        self.copy_pages(source, sources, kv_cache, batch.blocks.gather(1, cols), pairs, heads)
        held.scatter_(1, cols, torch.where(pairs, pages, held.gather(1, cols)))
        return pairs.sum()

    def attended_blocks(self, batch: SelectionBatch, keep: torch.Tensor,
                        held: torch.Tensor) -> torch.Tensor:
        """``[R, C + 1]``: each row's blocks holding kept pages, in column order, then the
        block of the page being filled (at index ``num_keep``); the rest is unspecified."""
        kept = torch.nn.functional.pad(keep, (0, 1)).gather(1, held)
        order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)
        table = torch.nn.functional.pad(batch.blocks.gather(1, order), (0, 1))
        at = batch.num_keep[:, None]
        partial = batch.partial_blocks[:, None]
        table.scatter_(1, at, torch.where(partial >= 0, partial, table.gather(1, at)))
        return table

    def backup(self, kv_cache: torch.Tensor, block_format: BlockFormat, blocks: torch.Tensor,
               slots: torch.Tensor, digests: torch.Tensor, host_pages: torch.Tensor | None,
               digest_kind: str) -> None:
        """Digest the full pages in ``blocks`` into ``digests[slots]``; copy them to
        ``host_pages[slots]`` unless ``host_pages`` is None."""
        pages = block_format.read(kv_cache, blocks)
        hi, lo = page_digests(block_format.keys(pages), digest_kind)
        digests.index_copy_(0, slots, stored_digests(hi, lo, digests.dtype))
        if host_pages is not None:
            host_pages.index_copy_(0, slots.to(host_pages.device), pages.to(host_pages.device))

    def add_page_statistics(self, logits: torch.Tensor, batch, layer: int,
                            block_size: int) -> None:
        """Add the observing queries' attention masses per page, from ``logits``
        ``[queries, kv_heads, group, C * block_size]`` (their scaled products with their rows'
        keys, in column order; the one-query rows' queries, then each window row's), to the
        statistics of ``batch`` (a :class:`~vllm_kvevict.attention_pages.StatsBatch`) in
        ``layer``."""
        rows, single = batch.num_observing, batch.num_single
        num_cols = logits.shape[-1] // block_size
        held = batch.held[layer, :rows, :num_cols]  # [R, C]
        key_positions = held.unsqueeze(-1) * block_size + torch.arange(block_size,
                                                                       device=held.device)
        if rows > single:  # window rows: one entry per query
            key_positions = key_positions.index_select(0, batch.query_rows)  # [queries, C, bs]
        positions = batch.query_positions.unsqueeze(1)
        mass = page_mass_from_logits(logits.unsqueeze(1), key_positions, positions)[:, 0]
        seen_tokens = (key_positions <= positions.unsqueeze(-1)).sum(-1)  # [queries, C]
        hit = attended(mass, seen_tokens)
        # TOTAL, SQUARES, COUNT, ATTENDED: rows 0..NUM_SUMS - 1
        added = torch.stack([mass, mass * mass, (seen_tokens > 0).float(), hit.float()], 1)
        last = mass
        use = latest_use(hit, seen_tokens, batch.query_positions, key_positions[:, :, 0])
        if rows > single:  # sums over each row's queries; its last query's mass; latest use
            added = torch.zeros((rows, NUM_SUMS, num_cols), dtype=mass.dtype,
                                device=mass.device).index_add_(0, batch.query_rows, added)
            last = mass.index_select(0, batch.last_query)
            use = torch.zeros((rows, num_cols), dtype=use.dtype,
                              device=use.device).scatter_reduce_(
                0, batch.query_rows.unsqueeze(1).expand(-1, num_cols), use, "amax")
        stats = batch.stats[layer, :rows]  # [R, NUM_STATS, P + 1]
        stats[:, :NUM_SUMS].scatter_add_(2, held.unsqueeze(1).expand(-1, NUM_SUMS, -1), added)
        stats[:, LAST].scatter_(1, held, last)
        stats[:, LAST_ATTENDED].scatter_reduce_(1, held, use, "amax")

    def copy_pages(self, src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor,
                   dst_ids: torch.Tensor, valid: torch.Tensor,
                   heads: torch.Tensor | None = None) -> None:
        """Page ``src_ids[i]`` of ``src`` over page ``dst_ids[i]`` of ``dst`` where ``valid[i]``
        (page tensors: a layer's KV cache or the host store, pages on dimension 0, KV heads on
        dimension 1), every KV head, or KV head ``heads[i]`` only."""
        from vllm_kvevict.kernels.transfer import copy_pages_reference

        copy_pages_reference(src, src_ids, dst, dst_ids, valid, heads)


class TritonPageOps(PageOps):
    """The kernels (CUDA; Triton's interpreter on CPU tensors), for vLLM's FlashAttention layout
    (:class:`~vllm_kvevict.pages.formats.FlashBlockFormat`). No host sync in any call: host
    pages are addressed in place (pinned, unified addressing) and copies are masked."""

    def __init__(self) -> None:
        super().__init__(host_sync_free=False)
        self._views: dict[int, torch.Tensor] = {}

    def score(self, policy, query, digests, batch):
        from vllm_kvevict.kernels.scoring import score_batch

        if not policy.digest_bound_score:
            return super().score(policy, query, digests, batch)
        heads = batch.heads
        if heads == 1:
            return score_batch(query.contiguous(), digests[:, 0], digests[:, 1],
                               batch.host_ids.contiguous(), batch.num_full, 0, 0)
        # One row per KV head: each request's query heads, scored per KV head.
        requests = query.unflatten(0, (-1, heads)).flatten(1, 2).contiguous()
        scores = score_batch(requests, digests[:, 0], digests[:, 1],
                             batch.host_ids[::heads].contiguous(), batch.num_full[::heads], 0, 0,
                             per_kv_head=True)
        return scores.flatten(0, 1)

    def backup(self, kv_cache, block_format, blocks, slots, digests, host_pages, digest_kind):
        from vllm_kvevict.kernels.digest import build_digests

        hi, lo = build_digests(block_format.key_cache(kv_cache), blocks, digest_kind)
        digests.index_copy_(0, slots, stored_digests(hi, lo, digests.dtype))
        if host_pages is not None:
            self.copy_pages(kv_cache, blocks, host_pages, slots,
                            torch.ones_like(blocks, dtype=torch.bool))

    def copy_pages(self, src, src_ids, dst, dst_ids, valid, heads=None):
        from vllm_kvevict.kernels.transfer import copy_pages

        device = src_ids.device
        copy_pages(self._view(src, device), src_ids, self._view(dst, device), dst_ids, valid,
                   device, heads)

    def _view(self, pages: torch.Tensor, device: torch.device) -> torch.Tensor:
        if pages.device == device:
            return pages
        from vllm_kvevict.kernels.transfer import host_view

        key = pages.data_ptr()
        if key not in self._views:
            self._views[key] = host_view(pages, device)
        return self._views[key]


class CompiledCPUPageOps(PageOps):
    """CPU: one compiled call per layer for every row (:mod:`vllm_kvevict.kernels.cpu`): the
    selection of policies scored by the digest bound, sparse block tables, backups of
    bfloat16/float32 caches, and the attention statistics' page masses; the rest as
    :class:`PageOps`."""

    def __init__(self, host_sync_free: bool = True) -> None:
        super().__init__(host_sync_free)
        from vllm_kvevict.kernels import cpu

        self._kernels = cpu
        self._key_offsets: dict[tuple[int, int], object] = {}
        self._arrays: dict[int, tuple[torch.Tensor, object]] = {}

    def select(self, policy, query, digests, batch, layer, kv_cache, source, from_host):
        if not policy.digest_bound_score or digests.dtype not in COMPILED_FLOATS:
            return super().select(policy, query, digests, batch, layer, kv_cache, source,
                                  from_host)
        cpu, views = self._kernels, batch.arrays
        if query.dtype not in COMPILED_FLOATS:
            query = query.float()
        mode = cpu.NO_PLACEMENT if source is None else (
            cpu.FROM_HOST if from_host else cpu.WITHIN_CACHE)
        cache = self._bits(kv_cache)
        moved = cpu.select_pages(
            _bits(query), query.dtype == torch.bfloat16, views.row_tokens, self._bits(digests),
            digests.dtype == torch.bfloat16, views.host_ids, views.num_full, views.pinned[layer],
            views.num_keep, views.held[layer], views.candidates, views.blocks, views.head_of_row,
            cache if source is None else self._bits(source), cache, mode, views.keep,
            views.scores, cpu.PREFETCH_PAGES)
        keep, scores = batch.outputs
        return keep, scores, moved

    def _bits(self, pages: torch.Tensor):
        """The integer numpy view of a long-lived tensor (KV cache, host store, digests), kept
        with the tensor, which every step passes again: found by the tensor's identity, the
        cheapest lookup for a per-layer call."""
        entry = self._arrays.get(id(pages))
        if entry is None or entry[0] is not pages:
            entry = self._arrays[id(pages)] = (pages, _bits(pages))
        return entry[1]

    def backup(self, kv_cache, block_format, blocks, slots, digests, host_pages, digest_kind):
        if kv_cache.dtype not in COMPILED_FLOATS or digests.dtype not in COMPILED_FLOATS:
            return super().backup(kv_cache, block_format, blocks, slots, digests, host_pages,
                                  digest_kind)
        _, _, block_size, row = kv_cache.shape
        key = (block_size, row)
        if key not in self._key_offsets:
            self._key_offsets[key] = block_format.key_offsets(block_size, row // 2).numpy()
        cache = self._bits(kv_cache)
        self._kernels.backup_pages(
            cache, blocks.numpy(), slots.numpy(), self._key_offsets[key], row // 2,
            kv_cache.dtype == torch.bfloat16, digest_kind == "cuboid-mean", self._bits(digests),
            digests.dtype == torch.bfloat16,
            cache if host_pages is None else self._bits(host_pages), host_pages is not None)

    def add_page_statistics(self, logits, batch, layer, block_size):
        if logits.dtype not in COMPILED_FLOATS:
            return super().add_page_statistics(logits, batch, layer, block_size)
        rows, views = batch.num_observing, batch.arrays
        self._kernels.add_page_statistics(
            _bits(logits.contiguous()), logits.dtype == torch.bfloat16, views.query_positions,
            views.row_starts, views.held[layer, :rows], views.row_cols, block_size,
            EVEN_SHARE_MARGIN, views.stats[layer, :rows])

    def attended_blocks(self, batch, keep, held):
        rows, num_cols = held.shape
        table = torch.empty((rows, num_cols + 1), dtype=torch.int64)
        views = batch.arrays
        self._kernels.attended_blocks(keep.numpy(), held.numpy(), views.blocks, views.num_keep,
                                      views.partial_blocks, table.numpy())
        return table


def _bits(pages: torch.Tensor):
    """``pages`` as a numpy array of same-width integers (numpy has no bfloat16)."""
    return pages.view(INT_OF_WIDTH[pages.element_size()]).numpy()


def page_ops_for(device: torch.device | str) -> PageOps:
    """The ops a worker on ``device`` runs: the Triton kernels on CUDA, the compiled CPU kernels
    on CPU (torch if numba is missing), torch elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return TritonPageOps()
    if device.type == "cpu":
        compiled = importlib.util.find_spec("numba") is not None
        return (CompiledCPUPageOps if compiled else PageOps)(host_sync_free=True)
    return PageOps(host_sync_free=False)
