"""Choosing which pages to keep: pinned sinks and recent window, then the best-scored pages."""
from __future__ import annotations

import torch


def select_pages(scores: torch.Tensor, sink_pages: int, window_pages: int, top_k: int) -> torch.Tensor:
    """Pages to keep for one request, ascending.

    Args:
        scores: ``[num_pages]`` (higher = keep). The last page is the most recent.
        sink_pages: first pages always kept.
        window_pages: last pages always kept.
        top_k: further pages kept, the best-scored among the rest.

    Returns:
        int64 page indices, sorted, of length ``min(num_pages, sink + window + top_k)``.
    """
    num_pages = scores.shape[0]
    keep = min(num_pages, sink_pages + window_pages + top_k)
    pinned = torch.zeros(num_pages, dtype=torch.bool, device=scores.device)
    pinned[:sink_pages] = True
    if window_pages:
        pinned[max(0, num_pages - window_pages):] = True
    ranked = torch.where(pinned, torch.full_like(scores, float("inf"), dtype=torch.float32),
                         scores.float())
    return torch.sort(topk_prefer_recent(ranked, keep)).values


def topk_prefer_recent(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values; among equal values the larger index wins."""
    flipped = ranked.flip(0)
    order = torch.argsort(flipped, descending=True, stable=True)[:k]
    return (ranked.shape[0] - 1 - order).to(torch.int64)
