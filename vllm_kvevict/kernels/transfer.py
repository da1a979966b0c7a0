"""Masked page copies between page tensors (a layer's KV cache, the host store), in one launch.

A page tensor is ``[num_pages, kv_heads, block_size, row]`` with a contiguous last dimension and
any other strides (vLLM 0.32's FlashAttention layer views in every ``KVCacheLayout``; the host
store). Pair ``i`` copies page ``src_ids[i]`` of ``src`` over page ``dst_ids[i]`` of ``dst`` when
``valid[i]`` (every KV head, or only KV head ``heads[i]``); pairs come padded (``[rows, width]``
from the page runtime), so the caller never needs to know on the host how many copies there are.

On CUDA a host-store tensor is read or written in place through its device view (pinned memory,
unified addressing): no staging copy and no host synchronisation. Reference:
:func:`copy_pages_reference`.
"""
from __future__ import annotations

import torch
import triton.language as tl

from vllm_kvevict.kernels.launch import Kernel, power_of_two
from vllm_kvevict.paging import INT_OF_WIDTH


def _copy_kernel(src, dst, src_ids, dst_ids, valid, heads,
                 src_page, src_head, src_token, dst_page, dst_head, dst_token, block_size, row,
                 BLOCK_T: tl.constexpr, ROW: tl.constexpr, ONE_HEAD: tl.constexpr):
    """One program per (pair, KV head): the head's ``block_size x row`` tile of the page
    (``ONE_HEAD``: one program per pair, for its head ``heads[pair]``)."""
    pair = tl.program_id(0)
    if ONE_HEAD:
        head = tl.load(heads + pair).to(tl.int64)
    else:
        head = tl.program_id(1)
    tokens = block_size * tl.load(valid + pair).to(tl.int32)  # 0: a masked pair
    s = tl.load(src_ids + pair).to(tl.int64)
    d = tl.load(dst_ids + pair).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    c = tl.arange(0, ROW)
    inside = (t[:, None] < tokens) & (c[None, :] < row)
    tile = tl.load(src + s * src_page + head * src_head + t[:, None] * src_token + c[None, :],
                   mask=inside, other=0)
    tl.store(dst + d * dst_page + head * dst_head + t[:, None] * dst_token + c[None, :], tile,
             mask=inside)


COPY = Kernel(_copy_kernel)



def copy_pages(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor,
               dst_ids: torch.Tensor, valid: torch.Tensor, device: torch.device,
               heads: torch.Tensor | None = None) -> None:
    """Copy page ``src_ids[i]`` of ``src`` over page ``dst_ids[i]`` of ``dst`` where ``valid[i]``:
    every KV head, or, given ``heads``, KV head ``heads[i]`` only.

    ``src_ids``, ``dst_ids``, ``valid`` (and ``heads``) have one shape (flattened here) and live on
    ``device``; ``src``/``dst`` are on ``device`` or are its host-store tensors (on CUDA: pinned
    device views, see :func:`host_view`). Destination pages of valid pairs are distinct.
    """
    num_pages, kv_heads, block_size, row = dst.shape
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"pages differ: {tuple(src.shape)} {src.dtype} vs "
                         f"{tuple(dst.shape)} {dst.dtype}")
    if src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError("page tensors need a contiguous last dimension")
    pairs = valid.numel()
    if not pairs:
        return
    bits = INT_OF_WIDTH[dst.element_size()]  # the interpreter reads halves only through a cast
    src_bits, dst_bits = src.view(bits), dst.view(bits)
    one_head = heads is not None
    head_ids = (heads if one_head else valid).reshape(-1).to(torch.int32)
    COPY.on(device)[(pairs, 1 if one_head else kv_heads)](
        src_bits, dst_bits, src_ids.reshape(-1).to(torch.int32),
        dst_ids.reshape(-1).to(torch.int32), valid.reshape(-1).to(torch.int8), head_ids,
        src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
        block_size, row, BLOCK_T=power_of_two(block_size), ROW=power_of_two(row),
        ONE_HEAD=one_head)


def copy_pages_reference(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor,
                         dst_ids: torch.Tensor, valid: torch.Tensor,
                         heads: torch.Tensor | None = None) -> None:
    """:func:`copy_pages` in torch (boolean indexing: a host sync on an accelerator)."""
    valid = valid.reshape(-1)
    take = src_ids.reshape(-1)[valid].to(src.device)
    into = dst_ids.reshape(-1)[valid].to(dst.device)
    if heads is None:
        dst.index_copy_(0, into, src.index_select(0, take).to(dst.device))
        return
    head = heads.reshape(-1)[valid]
    dst[into, head.to(dst.device)] = src[take, head.to(src.device)].to(dst.device)


def host_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (pinned) as a tensor kernels on ``device`` can address; itself off CUDA."""
    if device.type != "cuda" or host.device.type != "cpu":
        return host
    from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor

    return get_accelerator_view_from_cpu_tensor(host)
