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
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

NO_PLACEMENT, FROM_HOST, WITHIN_CACHE = 0, 1, 2
CACHE_LINE = 64
# Pages whose digests are prefetched ahead of the one being scored: the forward between two
# layers' selections pushes a layer's digests and host pages out of the caches.
PREFETCH_PAGES = 8


@intrinsic
def _prefetch(typingctx, array, byte_offset):
    """Hint the cache line ``byte_offset`` bytes into ``array``'s data into the caches (LLVM's
    ``prefetch``: a hint, never a fault, whatever the address)."""
    if not isinstance(array, types.Array) or not isinstance(byte_offset, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        byte = ir.IntType(8).as_pointer()
        address = builder.gep(builder.bitcast(data, byte), [offset])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        opaque = getattr(address.type, "is_opaque", False)
        name = "llvm.prefetch.p0" if opaque else "llvm.prefetch.p0i8"
        prefetch = cgutils.get_or_insert_function(builder.module, fnty, name)
        builder.call(prefetch, [address, i32(0), i32(3), i32(1)])  # read, keep, data
        return context.get_dummy_value()

    return types.void(array, byte_offset), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _prefetch_all(array):
    """Hint every cache line of a contiguous ``array`` into the caches."""
    for offset in range(0, array.size * array.itemsize, CACHE_LINE):
        _prefetch(array, offset)


@numba.njit(cache=True, nogil=True, inline="always")
def _float32_bits(raw, bfloat16):
    """float32 bits of one element's integer bits (``bfloat16``: its 16 bits, else float32's)."""
    if bfloat16:
        return (np.uint32(raw) & np.uint32(0xFFFF)) << np.uint32(16)
    return np.uint32(raw)


@numba.njit(cache=True, nogil=True, inline="always")
def _stored_bits(raw, up, bfloat16):
    """The bits a digest stores for a float32 value of bits ``raw``: the same, or
    (``bfloat16``) the nearest bfloat16 not below it (``up``) or not above it, so that the box
    only grows."""
    if not bfloat16:
        return raw
    kept = raw >> np.uint32(16)
    # Truncation moves towards zero: one step away from zero when that is the wrong way.
    if raw & np.uint32(0xFFFF) and (raw >> np.uint32(31) == 0) == up:
        kept += np.uint32(1)
    return kept


@numba.njit(cache=True, nogil=True, inline="always")
def _copy_head_page(dst, src):
    """``dst[:] = src`` for one head's ``[block_size, row]`` page, element by element: a loop
    numba vectorises (its slice assignment copies about 1.7x slower here)."""
    for t in range(dst.shape[0]):
        for e in range(dst.shape[1]):
            dst[t, e] = src[t, e]


@numba.njit(cache=True, nogil=True, inline="always")
def _copy_page(dst, src):
    """``dst[:] = src`` for a ``[kv_heads, block_size, row]`` page."""
    for h in range(dst.shape[0]):
        _copy_head_page(dst[h], src[h])


# Sums may be reordered (vectorised); infinities stay exact (pinned pages rank +inf).
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def select_pages(query, bfloat16, row_tokens, digests, bfloat16_digests, host_ids, num_full,
                 pinned, num_keep, held, candidates, blocks, head_of_row, source, cache, mode,
                 keep, scores, ahead):
    """Score, keep and place pages for every selection row; returns the (head) pages moved.

    Args:
        query: the layer's ``[tokens, q_heads, head_dim]`` queries as integer bits
            (``bfloat16``: 16-bit halves of float32, else float32 bits).
        row_tokens: ``[R]`` the query token of each selection row.
        digests: ``[slots, 2, kv_heads, head_dim]`` (``hi``, ``lo``) as integer bits
            (``bfloat16_digests``: bfloat16 bits, else float32 bits).
        host_ids, pinned: ``[R, P]`` digest slot of each page; pages always kept.
        num_full, num_keep: ``[R]`` pages of the row; pages it keeps.
        held, candidates, blocks: ``[R, C]`` page per column (updated), columns that may
            receive a kept page, block per column.
        head_of_row: ``[R]`` the KV head a row scores and moves, -1: all of them. Rows of
            single KV heads come as a request's heads ``0 .. kv_heads - 1`` in order, with the
            same pages (scored in one pass over them).
        source, cache: page tensors (integer views, pages on dimension 0): where kept pages
            come from (host store: ``FROM_HOST``, by host id; the cache: ``WITHIN_CACHE``, by
            the page's own column) and the layer's KV cache.
        mode: ``NO_PLACEMENT`` (score and keep only), ``FROM_HOST`` or ``WITHIN_CACHE``.
        keep, scores: ``[R, P]`` outputs.
        ahead: pages whose digests are prefetched ahead of the one scored (0: none); a
            row's moved pages are prefetched before they are copied (``ahead > 0``).
    """
    rows = row_tokens.shape[0]
    q_heads, head_dim = query.shape[1], query.shape[2]
    kv_heads = digests.shape[2]
    half = kv_heads * head_dim
    flat = digests.reshape(digests.shape[0], 2 * half)
    digest_bits = np.empty(2 * half, dtype=np.uint32)  # one page's digest as float32
    digest = digest_bits.view(np.float32)
    weights = np.empty(2 * half, dtype=np.float32)
    bits = np.empty(q_heads * head_dim, dtype=np.uint32)
    values = bits.view(np.float32)
    # Scratch of _keep_and_place, allocated once per call.
    num_pages, num_cols = host_ids.shape[1], held.shape[1]
    best_scores = np.empty(num_pages + 1, dtype=np.float32)
    best_pages = np.empty(num_pages + 1, dtype=np.int64)
    in_place = np.empty(num_pages, dtype=np.bool_)
    missing = np.empty(num_pages, dtype=np.int64)
    victim_cols = np.empty(num_cols, dtype=np.int64)
    victim_scores = np.empty(num_cols, dtype=np.float32)
    moved = 0
    for p in range(min(ahead, num_full[0] if rows else 0)):
        _prefetch_all(flat[host_ids[0, p]])
    r = 0
    while r < rows:
        # One request's rows: all KV heads at once, or one row per KV head.
        span = kv_heads if head_of_row[r] >= 0 else 1
        t = row_tokens[r]
        for h in range(q_heads):  # no division per element
            for d in range(head_dim):
                bits[h * head_dim + d] = _float32_bits(query[t, h, d], bfloat16)
        # max(q hi, q lo) = max(q, 0) hi + min(q, 0) lo, summed over the query heads that
        # read each KV head: weights of the flattened (hi, lo) digest.
        group = q_heads // kv_heads
        for k in range(kv_heads):
            for d in range(head_dim):
                positive = np.float32(0.0)
                negative = np.float32(0.0)
                for g in range(group):
                    v = values[(k * group + g) * head_dim + d]
                    if v > 0:
                        positive += v
                    else:
                        negative += v
                weights[k * head_dim + d] = positive
                weights[half + k * head_dim + d] = negative
        n = num_full[r]
        # A row over every KV head divides by the query heads; a row of one KV head, by its
        # group (the mean over the query heads reading the keys scored).
        scale = np.float32(q_heads if span == 1 else group)
        for p in range(n):
            if ahead:  # the digest ``ahead`` pages on, in this request or the next
                later, following = p + ahead, r + span
                if later < n:
                    _prefetch_all(flat[host_ids[r, later]])
                elif following < rows and later - n < num_full[following]:
                    _prefetch_all(flat[host_ids[following, later - n]])
            stored = flat[host_ids[r, p]]
            for e in range(2 * half):
                digest_bits[e] = _float32_bits(stored[e], bfloat16_digests)
            if span == 1:
                total = np.float32(0.0)
                for e in range(half):
                    total += digest[e] * weights[e] + digest[half + e] * weights[half + e]
                scores[r, p] = total / scale
            else:
                for k in range(span):
                    a = k * head_dim
                    total = np.float32(0.0)
                    for d in range(head_dim):
                        total += (digest[a + d] * weights[a + d]
                                  + digest[half + a + d] * weights[half + a + d])
                    scores[r + k, p] = total / scale
        for j in range(r, r + span):
            moved += _keep_and_place(j, n, scores, pinned, num_keep, held, candidates, blocks,
                                     host_ids, head_of_row, source, cache, mode, keep,
                                     best_scores, best_pages, in_place, missing, victim_cols,
                                     victim_scores, ahead > 0)
        r += span
    return moved


@numba.njit(cache=True, nogil=True, inline="always")
def _moved_from(mode, host_ids, blocks, r, page):
    """Where row ``r``'s kept ``page`` is copied from: its host page (``FROM_HOST``) or its own
    column's block (``WITHIN_CACHE``)."""
    return host_ids[r, page] if mode == FROM_HOST else blocks[r, page]


@numba.njit(cache=True, nogil=True)
def _keep_and_place(r, n, scores, pinned, num_keep, held, candidates, blocks, host_ids,
                    head_of_row, source, cache, mode, keep, best_scores, best_pages, in_place,
                    missing, victim_cols, victim_scores, prefetch):
    """Row ``r`` of :func:`select_pages` once scored: its keep mask and placement (the
    arrays after ``keep`` up to ``prefetch``: scratch, at least ``n + 1`` pages or the row's
    columns long; ``prefetch``: fetch the pages moved before copying them)."""
    keep[r, :] = False
    # The best num_keep pages, pinned first, the more recent page winning a tie: a sorted
    # list of the best so far, filled from the most recent page down (an equal score never
    # displaces a page already in it).
    count = min(num_keep[r], n)
    size = 0
    for p in range(n - 1, -1, -1):
        v = np.float32(np.inf) if pinned[r, p] else scores[r, p]
        if size == count and (count == 0 or not v > best_scores[size - 1]):
            continue
        at = size
        while at > 0 and v > best_scores[at - 1]:
            best_scores[at] = best_scores[at - 1]
            best_pages[at] = best_pages[at - 1]
            at -= 1
        best_scores[at] = v
        best_pages[at] = p
        if size < count:
            size += 1
    for j in range(size):
        keep[r, best_pages[j]] = True
    if mode == NO_PLACEMENT:
        return 0
    num_cols = held.shape[1]
    in_place[:n] = False
    for c in range(num_cols):
        if candidates[r, c] and held[r, c] < n:
            in_place[held[r, c]] = True
    num_missing = 0
    for p in range(n):
        if keep[r, p] and not in_place[p]:
            missing[num_missing] = p
            num_missing += 1
    if num_missing == 0:
        return 0
    # Victims: candidate columns holding pages not kept, lowest score first (ties: column).
    num_victims = 0
    for c in range(num_cols):
        page = held[r, c]
        if candidates[r, c] and not (page < n and keep[r, page]):
            victim_cols[num_victims] = c
            victim_scores[num_victims] = scores[r, page] if page < n else 0.0
            num_victims += 1
    if num_victims < num_missing:
        raise RuntimeError("vllm-kvevict: fewer columns to overwrite than kept pages")
    head = head_of_row[r]
    for i in range(num_missing):
        # The lowest-scored victim left (the first in column order among equals).
        lowest = i
        for v in range(i + 1, num_victims):
            if victim_scores[v] < victim_scores[lowest]:
                lowest = v
        # Move it to position i, keeping the rest in column order (a stable selection).
        col, low_score = victim_cols[lowest], victim_scores[lowest]
        for v in range(lowest, i, -1):
            victim_cols[v] = victim_cols[v - 1]
            victim_scores[v] = victim_scores[v - 1]
        victim_cols[i], victim_scores[i] = col, low_score
        if prefetch:
            src = _moved_from(mode, host_ids, blocks, r, missing[i])
            if head >= 0:
                _prefetch_all(source[src, head])
                _prefetch_all(cache[blocks[r, col], head])
            else:
                _prefetch_all(source[src])
                _prefetch_all(cache[blocks[r, col]])
    # Missing page i goes to column victim_cols[i].
    for i in range(num_missing):
        page, col = missing[i], victim_cols[i]
        src = _moved_from(mode, host_ids, blocks, r, page)
        if head >= 0:
            _copy_head_page(cache[blocks[r, col], head], source[src, head])
        else:
            _copy_page(cache[blocks[r, col]], source[src])
        held[r, col] = page
    return num_missing


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
                 bfloat16_digests, host_pages, copy):
    """Digest the full pages in ``blocks`` into ``digests[slots]`` and (``copy``) copy them,
    bit for bit, to ``host_pages[slots]``.

    ``cache``: the layer's ``[blocks, kv_heads, block_size, row]`` integer view (``bfloat16``:
    16-bit halves of float32, else float32 bits); key ``(t, d)`` of a head is element
    ``key_offsets[t * head_dim + d]`` of the head's ``[block_size, row]`` tile, read row-major.
    Digests as :func:`vllm_kvevict.algorithms.digest.page_digests` (``cuboid_mean`` or max/min),
    stored as :func:`vllm_kvevict.algorithms.digest.stored_digests` stores them, as integer bits
    (``bfloat16_digests``: bfloat16, rounded outward; else float32).
    """
    kv_heads, block_size, row = cache.shape[1], cache.shape[2], cache.shape[3]
    count = block_size * head_dim
    # Each key's (token, column) in the tile, divided out once per call, not per element.
    tokens = np.empty(count, dtype=np.int64)
    columns = np.empty(count, dtype=np.int64)
    for e in range(count):
        tokens[e] = key_offsets[e] // row
        columns[e] = key_offsets[e] % row
    bits = np.empty(count, dtype=np.uint32)
    keys = bits.view(np.float32)  # [block_size, head_dim]
    top = np.empty(head_dim, dtype=np.float32)
    bottom = np.empty(head_dim, dtype=np.float32)
    top_bits, bottom_bits = top.view(np.uint32), bottom.view(np.uint32)
    centre = np.empty(head_dim, dtype=np.float32)
    spread = np.empty(head_dim, dtype=np.float64)
    for i in range(blocks.shape[0]):
        block, slot = blocks[i], slots[i]
        for h in range(kv_heads):
            tile = cache[block, h]
            for e in range(count):
                bits[e] = _float32_bits(tile[tokens[e], columns[e]], bfloat16)
            # Channels innermost (vectorises); tokens in order, so sums come out as torch's.
            top[:] = keys[:head_dim]
            bottom[:] = keys[:head_dim]
            for t in range(1, block_size):
                for d in range(head_dim):
                    v = keys[t * head_dim + d]
                    top[d] = max(top[d], v)
                    bottom[d] = min(bottom[d], v)
            if cuboid_mean:  # the box's centre +- the mean distance from it
                for d in range(head_dim):
                    centre[d] = (top[d] + bottom[d]) / np.float32(2.0)
                    spread[d] = 0.0
                for t in range(block_size):
                    for d in range(head_dim):
                        spread[d] += abs(keys[t * head_dim + d] - centre[d])
                for d in range(head_dim):
                    radius = np.float32(spread[d] / block_size)
                    top[d], bottom[d] = centre[d] + radius, centre[d] - radius
            for d in range(head_dim):
                digests[slot, 0, h, d] = _stored_bits(top_bits[d], True, bfloat16_digests)
                digests[slot, 1, h, d] = _stored_bits(bottom_bits[d], False, bfloat16_digests)
        if copy:
            _copy_page(host_pages[slot], cache[block])


# Attention statistics (h2o, tova, roco, snapkv, lra, lfa): rows of NUM_STATS (see
# vllm_kvevict.algorithms.attention_stats).
_TOTAL, _SQUARES, _COUNT, _ATTENDED, _LAST, _LAST_ATTENDED = range(6)


@numba.njit(cache=True, nogil=True, inline="always")
def _exp_shifted(values, top, bits, count):
    """``values[:count] = exp(values[:count] - top)`` for arguments <= 0, in a loop that
    vectorises (libm's expf does not): a polynomial times 2^n, as two factors so that tiny
    results come out denormal as torch's do (relative error within 2e-7 for normal results).
    ``bits``: int32 scratch of at least ``2 * count``."""
    scale = bits.view(np.float32)
    for j in range(count):
        v = max(values[j] - top, np.float32(-104.0))
        n = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
        r = v - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        values[j] = p * r * r + r + np.float32(1.0)
        low = np.int32(n) >> np.int32(1)
        bits[j] = (low + np.int32(127)) << np.int32(23)  # the factors in two runs: vectorises
        bits[count + j] = (np.int32(n) - low + np.int32(127)) << np.int32(23)
    for j in range(count):
        values[j] = values[j] * scale[j] * scale[count + j]


@numba.njit(cache=True, nogil=True, inline="always")
def _seen_max(values, seen, cols, block_size):
    """The largest of the first ``seen[c]`` values of each column (exact in any order: taken
    in four interleaved runs, which vectorise)."""
    a = b = c = d = top = np.float32(-np.inf)
    for col in range(cols):
        base, n = col * block_size, seen[col]
        whole = n - n % 4
        for t in range(base, base + whole, 4):
            a = max(a, values[t])
            b = max(b, values[t + 1])
            c = max(c, values[t + 2])
            d = max(d, values[t + 3])
        for t in range(base + whole, base + n):
            top = max(top, values[t])
    return max(max(max(a, b), max(c, d)), top)


@numba.njit(cache=True, nogil=True, inline="always")
def _page_sum(values, base, n):
    """The sum of ``values[base:base + n]`` in eight interleaved runs (which vectorise), added
    in a fixed order: the same values give the same sum at any ``base``."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    whole = n - n % 8
    for t in range(base, base + whole, 8):
        s0 += values[t]
        s1 += values[t + 1]
        s2 += values[t + 2]
        s3 += values[t + 3]
        s4 += values[t + 4]
        s5 += values[t + 5]
        s6 += values[t + 6]
        s7 += values[t + 7]
    total = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))
    for t in range(base + whole, base + n):
        total += values[t]
    return total


# No compiler reassociation (sums run in the order _page_sum writes out): equal logits give equal
# masses, wherever they lie (ties rank by page).
@numba.njit(cache=True, nogil=True)
def add_page_statistics(logits, bfloat16, query_positions, row_starts, held, row_cols,
                        block_size, margin, stats):
    """Turn the observing queries' products with their rows' keys into attention masses per
    page and add them to the rows' statistics, as the torch path does.

    Args:
        logits: ``[Q, kv_heads, group, C * block_size]`` scaled products ``scale * q . k``
            as integer bits (``bfloat16``: 16-bit halves of float32, else float32 bits), keys
            in column order; the queries of row ``r`` at ``row_starts[r]:row_starts[r + 1]``.
        query_positions: ``[Q]`` each query's position.
        held: ``[R, C]`` the page each column holds; ``row_cols`` ``[R]`` the row's columns
            (the rest is padding, never read).
        margin: the even-share margin of ``attended``.
        stats: ``[R, NUM_STATS, P + 1]`` float32, updated.
    """
    rows = row_starts.shape[0] - 1
    kv_heads, group, width = logits.shape[1], logits.shape[2], logits.shape[3]
    bits = np.empty(width, dtype=np.uint32)
    values = bits.view(np.float32)
    exp_bits = np.empty(2 * width, dtype=np.int32)
    share = np.float32(1.0) / np.float32(kv_heads * group)
    seen = np.empty(width // block_size, dtype=np.int64)  # per column, for the query at hand
    mass = np.empty(width // block_size, dtype=np.float32)
    sums = np.empty(width // block_size, dtype=np.float32)
    for r in range(rows):
        cols = row_cols[r]
        for q in range(row_starts[r], row_starts[r + 1]):
            position = query_positions[q]
            visible = 0
            for c in range(cols):
                seen[c] = min(max(position - held[r, c] * block_size + 1, 0), block_size)
                visible += seen[c]
            mass[:cols] = 0.0
            # Softmax over the keys the query sees (the first seen[c] of each column); page
            # sums, averaged over the query heads.
            for h in range(kv_heads):
                for g in range(group):
                    row = logits[q, h, g]
                    for j in range(cols * block_size):
                        bits[j] = _float32_bits(row[j], bfloat16)
                    top = _seen_max(values, seen, cols, block_size)
                    _exp_shifted(values, top, exp_bits, cols * block_size)
                    total = np.float32(0.0)
                    for c in range(cols):
                        page = _page_sum(values, c * block_size, seen[c])
                        sums[c] = page
                        total += page
                    scale = share / total
                    for c in range(cols):
                        mass[c] += sums[c] * scale
            last = q == row_starts[r + 1] - 1
            for c in range(cols):
                page = held[r, c]
                m = mass[c]
                hit = m * np.float32(visible) > np.float32(seen[c]) * np.float32(margin)
                stats[r, _TOTAL, page] += m
                stats[r, _SQUARES, page] += m * m
                if seen[c] > 0:
                    stats[r, _COUNT, page] += 1.0
                if hit:
                    stats[r, _ATTENDED, page] += 1.0
                if last:
                    stats[r, _LAST, page] = m
                use = np.float32(position) if hit else (
                    np.float32(page * block_size) if seen[c] > 0 else 0.0)
                if use > stats[r, _LAST_ATTENDED, page]:
                    stats[r, _LAST_ATTENDED, page] = use
