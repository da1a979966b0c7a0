"""Page digests built straight from the paged key cache (reference:
:func:`vllm_kvevict.algorithms.digest.page_digests`)."""
from __future__ import annotations

import torch
import triton.language as tl

from vllm_kvevict.algorithms.digest import DIGEST_KINDS
from vllm_kvevict.kernels.launch import Kernel, power_of_two


def _digest_kernel(key_cache, block_ids, hi, lo,
                   stride_block, stride_token, stride_head, num_kv_heads, head_dim,
                   PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, CUBOID_MEAN: tl.constexpr):
    """One program per (page, KV head): the box of the page's keys over its tokens."""
    page = tl.program_id(0)
    head = tl.program_id(1)
    block = tl.load(block_ids + page).to(tl.int64)
    t = tl.arange(0, PAGE_SIZE)
    d = tl.arange(0, HEAD_DIM)
    d_ok = d < head_dim
    keys = tl.load(key_cache + block * stride_block + head * stride_head
                   + t[:, None] * stride_token + d[None, :],
                   mask=d_ok[None, :], other=0.0).to(tl.float32)
    top = tl.max(keys, axis=0)
    bottom = tl.min(keys, axis=0)
    if CUBOID_MEAN:
        centre = (top + bottom) * 0.5
        radius = tl.sum(tl.abs(keys - centre[None, :]), axis=0) / PAGE_SIZE
        top = centre + radius
        bottom = centre - radius
    out = (page * num_kv_heads + head) * head_dim + d
    tl.store(hi + out, top, mask=d_ok)
    tl.store(lo + out, bottom, mask=d_ok)


DIGEST = Kernel(_digest_kernel)


def build_digests(key_cache: torch.Tensor, block_ids: torch.Tensor,
                  kind: str = "cuboid-mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Digests of the full pages held in ``block_ids``.

    Args:
        key_cache: ``[num_blocks, page_size, num_kv_heads, head_dim]``, last dimension
            contiguous, page size a power of two.
        block_ids: ``[n]`` physical blocks, each a full page.
        kind: one of :data:`~vllm_kvevict.algorithms.digest.DIGEST_KINDS`.

    Returns:
        ``(hi, lo)``, each ``[n, num_kv_heads, head_dim]`` float32.
    """
    if kind not in DIGEST_KINDS:
        raise ValueError(f"unknown digest kind {kind!r}; choose one of {DIGEST_KINDS}")
    _, page_size, num_kv_heads, head_dim = key_cache.shape
    if key_cache.stride(-1) != 1 or page_size & (page_size - 1):
        raise ValueError("key cache needs a contiguous last dimension and a power-of-two page")
    n = block_ids.numel()
    hi = torch.empty((n, num_kv_heads, head_dim), dtype=torch.float32, device=key_cache.device)
    lo = torch.empty_like(hi)
    if n:
        DIGEST.on(key_cache.device)[(n, num_kv_heads)](
            key_cache, block_ids.to(torch.int32), hi, lo,
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), num_kv_heads, head_dim,
            PAGE_SIZE=page_size, HEAD_DIM=power_of_two(head_dim),
            CUBOID_MEAN=kind == "cuboid-mean")
    return hi, lo
