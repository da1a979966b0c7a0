"""Compiled CPU kernels (numba, which vLLM's CPU build depends on) for the page runtime's
per-layer work: one call per layer for every row, where the torch path makes some forty small
tensor calls whose dispatch, not their arithmetic, is the cost on a CPU.

Each kernel computes exactly what the torch path of :class:`vllm_kvevict.pages.ops.PageOps`
computes (tests compare them through the runtime). Page copies move raw bits (integer views of
the caches), so any cache dtype works.
"""
from __future__ import annotations

import numba
import numpy as np

NO_PLACEMENT, FROM_HOST, WITHIN_CACHE = 0, 1, 2


# Sums may be reordered (vectorised); infinities stay exact (pinned pages rank +inf).
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def select_pages(query, digests, host_ids, num_full, pinned, num_keep, held, candidates, blocks,
                 head_of_row, source, cache, mode, keep, scores):
    """Score, keep and place pages for every selection row; returns the (head) pages moved.

    Args:
        query: ``[R, heads, head_dim]`` float32, one query per row: every query head, or
            the query heads reading the row's KV head.
        digests: ``[slots, 2, kv_heads, head_dim]`` float32 (``hi``, ``lo``).
        host_ids, pinned: ``[R, P]`` digest slot of each page; pages always kept.
        num_full, num_keep: ``[R]`` pages of the row; pages it keeps.
        held, candidates, blocks: ``[R, C]`` page per column (updated), columns that may
            receive a kept page, block per column.
        head_of_row: ``[R]`` the KV head a row scores and moves, -1: all of them.
        source, cache: page tensors (integer views, pages on dimension 0): where kept pages
            come from (host store: ``FROM_HOST``, by host id; the cache: ``WITHIN_CACHE``, by
            the page's own column) and the layer's KV cache.
        mode: ``NO_PLACEMENT`` (score and keep only), ``FROM_HOST`` or ``WITHIN_CACHE``.
        keep, scores: ``[R, P]`` outputs (``keep`` all False on entry).
    """
    rows, heads, head_dim = query.shape
    kv_heads = digests.shape[2]
    num_cols = held.shape[1]
    bounds = np.empty((2, kv_heads, head_dim), dtype=np.float32)
    moved = 0
    for r in range(rows):
        first_head, last_head = 0, kv_heads
        if head_of_row[r] >= 0:
            first_head, last_head = head_of_row[r], head_of_row[r] + 1
        group = heads // (last_head - first_head)
        # max(q hi, q lo) = max(q, 0) hi + min(q, 0) lo, summed over the group's heads.
        for k in range(first_head, last_head):
            for d in range(head_dim):
                positive = np.float32(0.0)
                negative = np.float32(0.0)
                for g in range(group):
                    v = query[r, (k - first_head) * group + g, d]
                    if v > 0:
                        positive += v
                    else:
                        negative += v
                bounds[0, k, d] = positive
                bounds[1, k, d] = negative
        n = num_full[r]
        ranked = np.empty(n, dtype=np.float32)
        for p in range(n):
            slot = host_ids[r, p]
            total = np.float32(0.0)
            for b in range(2):
                for k in range(first_head, last_head):
                    for d in range(head_dim):
                        total += digests[slot, b, k, d] * bounds[b, k, d]
            scores[r, p] = total / heads
            ranked[p] = np.inf if pinned[r, p] else scores[r, p]
        # The best num_keep pages, pinned first, the more recent page winning a tie.
        order = np.argsort(-ranked[::-1], kind="mergesort")
        for j in range(min(num_keep[r], n)):
            keep[r, n - 1 - order[j]] = True
        if mode == NO_PLACEMENT:
            continue
        in_place = np.zeros(n, dtype=np.bool_)
        for c in range(num_cols):
            if candidates[r, c] and held[r, c] < n:
                in_place[held[r, c]] = True
        missing = np.empty(n, dtype=np.int64)
        num_missing = 0
        for p in range(n):
            if keep[r, p] and not in_place[p]:
                missing[num_missing] = p
                num_missing += 1
        if num_missing == 0:
            continue
        # Victims: candidate columns holding pages not kept, lowest score first (ties: column).
        victim_cols = np.empty(num_cols, dtype=np.int64)
        victim_scores = np.empty(num_cols, dtype=np.float32)
        num_victims = 0
        for c in range(num_cols):
            page = held[r, c]
            if candidates[r, c] and not (page < n and keep[r, page]):
                victim_cols[num_victims] = c
                victim_scores[num_victims] = scores[r, page] if page < n else 0.0
                num_victims += 1
        if num_victims < num_missing:
            raise RuntimeError("vllm-kvevict: fewer columns to overwrite than kept pages")
        ranked_victims = np.argsort(victim_scores[:num_victims], kind="mergesort")
        for i in range(num_missing):
            page = missing[i]
            col = victim_cols[ranked_victims[i]]
            src = host_ids[r, page] if mode == FROM_HOST else blocks[r, page]
            if head_of_row[r] >= 0:
                cache[blocks[r, col], head_of_row[r]] = source[src, head_of_row[r]]
            else:
                cache[blocks[r, col]] = source[src]
            held[r, col] = page
            moved += 1
    return moved


@numba.njit(cache=True, nogil=True)
def attended_blocks(keep, held, blocks, num_keep, partial_blocks, table):
    """Each row's blocks holding kept pages in column order, then the other columns' blocks,
    then 0; the block of the page being filled (if any) written at index ``num_keep``.

    ``keep [R, P]``, ``held``/``blocks [R, C]``, ``num_keep``/``partial_blocks [R]``,
    ``table [R, C + 1]`` (output).
    """
    rows, num_cols = held.shape
    num_pages = keep.shape[1]
    for r in range(rows):
        at = 0
        for kept_first in (True, False):
            for c in range(num_cols):
                page = held[r, c]
                kept = page < num_pages and keep[r, page]
                if kept == kept_first:
                    table[r, at] = blocks[r, c]
                    at += 1
        table[r, num_cols] = 0
        if partial_blocks[r] >= 0:
            table[r, num_keep[r]] = partial_blocks[r]


@numba.njit(cache=True, nogil=True)
def backup_pages(cache, blocks, slots, key_offsets, head_dim, bfloat16, cuboid_mean, digests,
                 host_pages, copy):
    """Digest the full pages in ``blocks`` into ``digests[slots]`` and (``copy``) copy them,
    bit for bit, to ``host_pages[slots]``.

    ``cache``: the layer's ``[blocks, kv_heads, block_size, row]`` integer view (``bfloat16``:
    16-bit halves of float32, else float32 bits); key ``(t, d)`` of a head is element
    ``key_offsets[t * head_dim + d]`` of the head's ``[block_size, row]`` tile, read row-major.
    Digests as :func:`vllm_kvevict.algorithms.digest.page_digests` (``cuboid_mean`` or max/min).
    """
    kv_heads, block_size, row = cache.shape[1], cache.shape[2], cache.shape[3]
    bits = np.empty(block_size * head_dim, dtype=np.uint32)
    keys = bits.view(np.float32)
    for i in range(blocks.shape[0]):
        block, slot = blocks[i], slots[i]
        for h in range(kv_heads):
            for e in range(block_size * head_dim):
                offset = key_offsets[e]
                raw = cache[block, h, offset // row, offset % row]
                if bfloat16:
                    bits[e] = (np.uint32(raw) & np.uint32(0xFFFF)) << np.uint32(16)
                else:
                    bits[e] = np.uint32(raw)
            for d in range(head_dim):
                top = keys[d]
                bottom = keys[d]
                for t in range(1, block_size):
                    v = keys[t * head_dim + d]
                    top = max(top, v)
                    bottom = min(bottom, v)
                if cuboid_mean:
                    centre = (top + bottom) / np.float32(2.0)
                    spread = 0.0
                    for t in range(block_size):
                        spread += abs(keys[t * head_dim + d] - centre)
                    radius = np.float32(spread / block_size)
                    top, bottom = centre + radius, centre - radius
                digests[slot, 0, h, d] = top
                digests[slot, 1, h, d] = bottom
        if copy:
            host_pages[slot] = cache[block]
