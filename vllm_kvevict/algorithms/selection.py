"""Choosing which pages to keep: pinned sinks and recent window, then the best-scored pages."""
from __future__ import annotations

import torch


def select_pages(scores: torch.Tensor, sink_pages: int, window_pages: int,
                 top_k: int) -> torch.Tensor:
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
    pinned = torch.zeros(num_pages, dtype=torch.bool, device=scores.device)
    pinned[:sink_pages] = True
    if window_pages:
        pinned[max(0, num_pages - window_pages):] = True
    num_keep = torch.tensor([min(num_pages, sink_pages + window_pages + top_k)],
                            device=scores.device)
    kept = keep_mask(scores[None], torch.ones_like(pinned)[None], pinned[None], num_keep)
    return kept[0].nonzero().squeeze(1)


def keep_mask(scores: torch.Tensor, valid: torch.Tensor, pinned: torch.Tensor,
              num_keep: torch.Tensor) -> torch.Tensor:
    """Pages each request keeps, for a batch of requests: ``[rows, pages]`` bool.

    Args:
        scores: ``[rows, pages]`` (higher = keep); rows padded to the longest.
        valid: ``[rows, pages]`` False for padding.
        pinned: ``[rows, pages]`` pages always kept (sinks, window).
        num_keep: ``[rows]`` pages to keep, at most the row's valid pages; pinned pages first,
            then the best-scored, the more recent page winning a tie.
    """
    ranked = scores.float().masked_fill(pinned, float("inf")).masked_fill(~valid, float("-inf"))
    num_pages = ranked.shape[1]
    # A stable descending sort of the reversed row puts the more recent of equal pages first.
    order = torch.argsort(ranked.flip(1), dim=1, descending=True, stable=True)
    in_budget = torch.arange(num_pages, device=ranked.device) < num_keep[:, None]
    return torch.zeros_like(valid).scatter(1, num_pages - 1 - order, in_budget)


def topk_prefer_recent(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values; among equal values the larger index wins."""
    flipped = ranked.flip(0)
    order = torch.argsort(flipped, descending=True, stable=True)[:k]
    return (ranked.shape[0] - 1 - order).to(torch.int64)
