"""Plain-torch references for the kernels that have no counterpart in ``algorithms``."""
from __future__ import annotations

import torch


def sparse_decode_reference(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, blocks: torch.Tensor,
                            tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense float32 softmax attention over the tokens of each request's selected pages."""
    batch, num_q_heads, _ = query.shape
    group = num_q_heads // key_cache.shape[2]
    out = torch.zeros_like(query)
    for b in range(batch):
        pages = [(int(blk), int(n)) for blk, n in zip(blocks[b], tokens[b]) if n > 0]
        if not pages:
            continue
        k = torch.cat([key_cache[blk, :n] for blk, n in pages]).float()   # [T, kv, d]
        v = torch.cat([value_cache[blk, :n] for blk, n in pages]).float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        weights = (torch.einsum("hd,thd->ht", query[b].float(), k) * scale).softmax(dim=-1)
        out[b] = torch.einsum("ht,thd->hd", weights, v).to(query.dtype)
    return out
