"""Diagnostics for benchmarks: digest ranking against exact attention."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SelectionProbe:
    """Diagnostics (benchmarks only): how well digest scores find the pages that exact attention
    weighs most. For each selection, exact attention of the query over all backed-up pages (keys
    read from the host store) gives each page's attention mass (mean over query heads); among
    pages that are not pinned (sinks, window, anchors), the ``top_k`` by mass are compared with
    the ``top_k`` by digest score."""

    selections: int = 0
    top_k_overlap: float = 0.0  # sum over selections of |digest top-k & exact top-k| / k
    top1_hits: int = 0  # the heaviest unpinned page was among the digest top-k

    def record(self, query: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor,
               pinned: torch.Tensor, top_k: int) -> None:
        """``query [heads, d]``, ``keys [pages, page, kv_heads, d]``, ``scores`` and
        ``pinned`` ``[pages]``."""
        num_pages, page, kv_heads, head_dim = keys.shape
        unpinned = (~pinned).nonzero().squeeze(1)
        k = min(top_k, unpinned.numel())
        if k <= 0:
            return
        group = query.shape[0] // kv_heads
        q = query.float().view(kv_heads, group, head_dim)
        flat = keys.float().permute(2, 0, 1, 3).reshape(kv_heads, num_pages * page, head_dim)
        logits = torch.einsum("hgd,htd->hgt", q, flat) / head_dim ** 0.5
        mass = logits.softmax(-1).view(kv_heads, group, num_pages, page).sum(-1).mean((0, 1))
        exact = set(unpinned[mass[unpinned].topk(k).indices].tolist())
        digest = set(unpinned[scores[unpinned].topk(k).indices].tolist())
        self.selections += 1
        self.top_k_overlap += len(exact & digest) / k
        self.top1_hits += int(unpinned[mass[unpinned].argmax()].item() in digest)
