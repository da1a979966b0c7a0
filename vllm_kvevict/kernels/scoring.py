"""Digest scores for a decode batch, with sinks and window forced, and one top-k per request
(references: :func:`vllm_kvevict.algorithms.digest.score_pages`,
:func:`vllm_kvevict.algorithms.selection.select_pages`)."""
from __future__ import annotations

import torch
import triton.language as tl

from vllm_kvevict.kernels.launch import Kernel, power_of_two
from vllm_kvevict.paging import cdiv


def _score_kernel(query, hi, lo, page_slots, num_pages, scores,
                  stride_qb, stride_qh, stride_slots, stride_digest, max_pages, num_kv_heads,
                  head_dim,
                  sink_pages, window_pages,
                  GROUP: tl.constexpr, BLOCK_P: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (request, KV head, run of BLOCK_P pages): the mean over the KV head's
    query group of ``sum_d max(q_d hi_d, q_d lo_d)``; +inf for pinned pages, -inf past the end."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.load(num_pages + b)
    valid = p < n
    slot = tl.load(page_slots + b * stride_slots + p, mask=valid, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    d_ok = d < head_dim
    box = slot[:, None] * stride_digest + kv_head * head_dim + d[None, :]
    inside = valid[:, None] & d_ok[None, :]
    top = tl.load(hi + box, mask=inside, other=0.0).to(tl.float32)
    bottom = tl.load(lo + box, mask=inside, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for g in tl.static_range(GROUP):
        q = tl.load(query + b * stride_qb + (kv_head * GROUP + g) * stride_qh + d,
                    mask=d_ok, other=0.0).to(tl.float32)
        total += tl.sum(tl.maximum(q[None, :] * top, q[None, :] * bottom), axis=1)
    score = total / GROUP
    pinned = (p < sink_pages) | (p >= n - window_pages)
    score = tl.where(pinned, float("inf"), score)
    score = tl.where(valid, score, float("-inf"))
    tl.store(scores + (b * num_kv_heads + kv_head) * max_pages + p, score, mask=p < max_pages)


SCORE = Kernel(_score_kernel)


def score_batch(query: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                page_slots: torch.Tensor, num_pages: torch.Tensor, sink_pages: int,
                window_pages: int, per_kv_head: bool = False,
                block_pages: int = 64) -> torch.Tensor:
    """Scores of every request's pages for one decode query each.

    Args:
        query: ``[batch, num_q_heads, head_dim]``; query head ``h`` reads KV head
            ``h // (num_q_heads // num_kv_heads)``.
        hi, lo: ``[num_slots, num_kv_heads, head_dim]`` digests of any float type (any slot
            order; slots may be strided, e.g. views of one ``[num_slots, 2, kv_heads,
            head_dim]`` tensor).
        page_slots: ``[batch, max_pages]`` digest slot of each logical page (ragged: only the
            first ``num_pages[b]`` entries of row ``b`` are read).
        num_pages: ``[batch]`` logical pages per request.
        sink_pages, window_pages: first and last pages forced to +inf.
        per_kv_head: True gives ``[batch, num_kv_heads, max_pages]``; False the mean over KV
            heads, ``[batch, max_pages]`` (the mean over all query heads, GQA groups being equal).

    Returns float32 scores, -inf past each request's last page.
    """
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = hi.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not divide into {num_kv_heads} KV heads")
    if query.stride(-1) != 1 or page_slots.stride(-1) != 1:
        raise ValueError("query and page_slots need a contiguous last dimension")
    if hi.stride() != lo.stride() or hi.stride()[1:] != (head_dim, 1):
        hi, lo = hi.contiguous(), lo.contiguous()
    max_pages = page_slots.shape[1]
    scores = torch.empty((batch, num_kv_heads, max_pages), dtype=torch.float32,
                         device=query.device)
    if batch and max_pages:
        block_p = min(power_of_two(max_pages), block_pages)
        grid = (batch, num_kv_heads, cdiv(max_pages, block_p))
        SCORE.on(query.device)[grid](
            query, hi, lo, page_slots.to(torch.int32), num_pages.to(torch.int32), scores,
            query.stride(0), query.stride(1), page_slots.stride(0), hi.stride(0), max_pages,
            num_kv_heads, head_dim, sink_pages, window_pages,
            GROUP=num_q_heads // num_kv_heads, BLOCK_P=block_p, HEAD_DIM=power_of_two(head_dim))
    return scores if per_kv_head else scores.mean(dim=1)


def top_pages(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best pages of each request in one top-k.

    Args:
        scores: ``[batch, max_pages]`` from :func:`score_batch` (pinned +inf, absent -inf).
        keep: pages per request (sinks + window + top-k).

    Returns:
        ``(pages, counts)``: ``[batch, min(keep, max_pages)]`` int64 logical pages, ascending,
        padded with -1 after the first ``counts[b] = min(keep, num_pages[b])`` entries.
    """
    batch, max_pages = scores.shape
    k = min(keep, max_pages)
    values, index = torch.topk(scores, k, dim=1)
    present = values > float("-inf")
    index = torch.where(present, index, torch.full_like(index, max_pages))
    index = torch.sort(index, dim=1).values
    index = torch.where(index == max_pages, torch.full_like(index, -1), index)
    return index, present.sum(dim=1)


def selected_blocks(pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical blocks and valid token counts of selected logical pages (-1: none).

    ``block_table[b, p]`` is logical page ``p``'s block; every page is full except the last,
    which holds ``seq_lens[b] - (num_pages - 1) * page_size`` tokens.
    """
    chosen = pages.clamp(min=0)
    blocks = torch.gather(block_table.to(torch.int64), 1, chosen)
    last = (seq_lens.to(torch.int64) - 1) // page_size
    tokens = torch.where(chosen == last[:, None],
                         seq_lens.to(torch.int64)[:, None] - last[:, None] * page_size,
                         torch.full_like(chosen, page_size))
    tokens = torch.where(pages >= 0, tokens, torch.zeros_like(tokens))
    return blocks.to(torch.int32), tokens.to(torch.int32)
