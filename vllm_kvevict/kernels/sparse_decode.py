"""Decode attention over a per-request list of selected pages (split-K, flash-decoding style).

Each program reads a run of one request's selected pages for one KV head and its whole query
group, keeping an online softmax; a second kernel merges the runs. Reference:
:func:`vllm_kvevict.kernels.reference.sparse_decode_reference`.
"""
from __future__ import annotations

import torch
import triton.language as tl

from vllm_kvevict.kernels.launch import Kernel, power_of_two
from vllm_kvevict.paging import cdiv

# Programs to aim for when splitting (about two per streaming multiprocessor on an H100).
TARGET_PROGRAMS = 264


def _split_kernel(query, key_cache, value_cache, blocks, tokens, part_acc, part_max, part_sum,
                  stride_qb, stride_qh, stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh, stride_sel, max_selected, pages_per_split,
                  num_splits, num_q_heads, head_dim, scale,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    d = tl.arange(0, HEAD_DIM)
    d_ok = d < head_dim
    t = tl.arange(0, PAGE_SIZE)
    heads = kv_head * GROUP + g
    q = tl.load(query + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    first = split * pages_per_split
    for i in range(first, first + pages_per_split):
        n_tok = tl.load(tokens + b * stride_sel + i, mask=i < max_selected, other=0)
        if n_tok > 0:
            block = tl.load(blocks + b * stride_sel + i).to(tl.int64)
            t_ok = t < n_tok
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(key_cache + block * stride_kb + kv_head * stride_kh
                        + t[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(tl.float32))) * scale
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(value_cache + block * stride_vb + kv_head * stride_vh
                        + t[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            m_i = m_new
    row = (b * num_q_heads + heads) * num_splits + split
    tl.store(part_max + row, m_i, mask=g_ok)
    tl.store(part_sum + row, l_i, mask=g_ok)
    tl.store(part_acc + row[:, None] * head_dim + d[None, :], acc,
             mask=g_ok[:, None] & d_ok[None, :])


def _merge_kernel(part_acc, part_max, part_sum, out, stride_ob, stride_oh, num_q_heads,
                  num_splits, head_dim, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (request, query head); a request with nothing selected gets zeros."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    d_ok = d < head_dim
    row = (b * num_q_heads + h) * num_splits + s
    m = tl.load(part_max + row, mask=s_ok, other=float("-inf"))
    m_all = tl.max(m, axis=0)
    weight = tl.exp(m - tl.where(m_all > float("-inf"), m_all, 0.0))  # 0 for empty runs
    total = tl.sum(weight * tl.load(part_sum + row, mask=s_ok, other=0.0), axis=0)
    acc = tl.load(part_acc + row[:, None] * head_dim + d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    merged = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out + b * stride_ob + h * stride_oh + d, merged.to(out.dtype.element_ty), mask=d_ok)


SPLIT = Kernel(_split_kernel)
MERGE = Kernel(_merge_kernel)


def sparse_paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        blocks: torch.Tensor, tokens: torch.Tensor, scale: float,
                        num_splits: int | None = None) -> torch.Tensor:
    """Attention of one decode query per request over its selected pages only.

    Args:
        query: ``[batch, num_q_heads, head_dim]``.
        key_cache, value_cache: ``[num_blocks, page_size, num_kv_heads, head_dim]``, last dim
            contiguous; page size a power of two >= 16 (tensor-core tiles).
        blocks, tokens: ``[batch, max_selected]`` int32, a selected page's block and its number
            of valid tokens (0: no page; a page's tokens are its first ones).
        scale: softmax scale.
        num_splits: runs per (request, KV head); default from :data:`TARGET_PROGRAMS`.

    Returns ``[batch, num_q_heads, head_dim]`` in the query's dtype; a request with no
    selected page gets zeros. Equals dense attention over the selected pages' tokens.
    """
    batch, num_q_heads, head_dim = query.shape
    _, page_size, num_kv_heads, _ = key_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not divide into {num_kv_heads} KV heads")
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two >= 16")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and caches need a contiguous last dimension")
    blocks = blocks.to(torch.int32).contiguous()
    tokens = tokens.to(torch.int32).contiguous()
    max_selected = blocks.shape[1]
    out = torch.zeros_like(query)
    if not batch or not max_selected:
        return out
    if num_splits is None:
        num_splits = max(1, min(max_selected, cdiv(TARGET_PROGRAMS, batch * num_kv_heads)))
    pages_per_split = cdiv(max_selected, num_splits)
    num_splits = cdiv(max_selected, pages_per_split)
    shape = (batch, num_q_heads, num_splits)
    part_max = torch.empty(shape, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty((*shape, head_dim), dtype=torch.float32, device=query.device)
    group = num_q_heads // num_kv_heads
    SPLIT.on(query.device)[(batch, num_kv_heads, num_splits)](
        query, key_cache, value_cache, blocks, tokens, part_acc, part_max, part_sum,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        blocks.stride(0), max_selected, pages_per_split, num_splits, num_q_heads, head_dim,
        scale, GROUP=group, GROUP_PAD=max(16, power_of_two(group)), PAGE_SIZE=page_size,
        HEAD_DIM=max(16, power_of_two(head_dim)))
    MERGE.on(query.device)[(batch, num_q_heads)](
        part_acc, part_max, part_sum, out, out.stride(0), out.stride(1), num_q_heads,
        num_splits, head_dim, SPLITS_PAD=power_of_two(num_splits),
        HEAD_DIM=power_of_two(head_dim))
    return out
