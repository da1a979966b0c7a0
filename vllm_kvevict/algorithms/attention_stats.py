"""Attention statistics of pages: what H2O, TOVA, RoCo and SnapKV rank pages by.

Fused attention kernels do not return attention weights, so they are recomputed here for the few
queries that feed the statistics (each decode query, the observation window at a prompt's end)
against the keys the kernel attended over.

Token to page: a page's attention mass for one query is the sum of the probabilities of its
tokens (GQA: probabilities averaged over the query heads of a group, as EasyKV does), averaged
over KV heads, because one block table serves every head of a layer. The statistics of a page are
then the token statistics of EasyKV applied to that mass: sum ``A``, sum of squares ``S`` and
count ``C`` of the queries that saw the page, and the last query's mass.
"""
from __future__ import annotations

import dataclasses

import torch

# Rows of a statistics tensor ``[NUM_STATS, num_pages]`` (the sums first, in this order).
TOTAL, SQUARES, COUNT, LAST = range(4)
NUM_STATS = 4


def page_attention_mass(queries: torch.Tensor, keys: torch.Tensor, key_positions: torch.Tensor,
                        query_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention mass each page receives from each query, for one request or a batch (leading
    dimensions ``...``, the same on every argument).

    Args:
        queries: ``[..., n, num_q_heads, head_dim]``.
        keys: ``[..., pages, page_size, num_kv_heads, head_dim]`` (post-RoPE, as cached).
        key_positions: ``[..., pages, page_size]`` token positions; a key is seen by queries at
            the same or a later position (pad a partial page with positions past every query).
        query_positions: ``[..., n]``.
        scale: the softmax scale of the layer.

    Returns:
        ``[..., n, pages]`` float32; each row sums to 1 over the pages the query sees.
    """
    num_kv_heads = keys.shape[-2]
    q = queries.float().unflatten(-2, (num_kv_heads, -1))             # [..., n, kv, g, d]
    k = keys.float().flatten(-4, -3)                                   # [..., t, kv, d]
    logits = torch.einsum("...nhgd,...thd->...nhgt", q, k) * scale
    return page_mass_from_logits(logits, key_positions, query_positions)


def page_mass_from_logits(logits: torch.Tensor, key_positions: torch.Tensor,
                          query_positions: torch.Tensor) -> torch.Tensor:
    """:func:`page_attention_mass` from the scaled products ``scale * q . k``: ``logits``
    ``[..., n, num_kv_heads, group, pages * page_size]``, keys in page order, in any float
    dtype (the softmax is taken in float32). Returns ``[..., n, pages]`` float32."""
    num_pages, page_size = key_positions.shape[-2:]
    seen = (key_positions.flatten(-2).to(query_positions.device).unsqueeze(-2)
            <= query_positions.unsqueeze(-1))                          # [..., n, t]
    logits = logits.masked_fill(~seen[..., :, None, None, :], float("-inf"))
    probs = logits.softmax(-1, dtype=torch.float32).unflatten(-1, (num_pages, page_size))
    # Tokens to pages, in one pass with the mean over the group's query heads (GQA); then the
    # mean over KV heads.
    return probs.sum((-3, -1)).div_(probs.shape[-3]).mean(-2)


def accumulate(stats: torch.Tensor, pages: torch.Tensor, mass: torch.Tensor,
               seen: torch.Tensor) -> None:
    """Add queries' masses to the statistics of ``pages``.

    Args:
        stats: ``[NUM_STATS, capacity]`` of one request and layer, by logical page.
        pages: ``[cols]`` logical page of each column of ``mass``.
        mass: ``[n, cols]`` from :func:`page_attention_mass`, queries in order.
        seen: ``[n, cols]`` bool, whether the query saw any token of the page.
    """
    mass = mass.to(stats.device)
    seen = seen.to(stats.device)
    pages = pages.to(stats.device)
    stats[TOTAL].index_add_(0, pages, mass.sum(0))
    stats[SQUARES].index_add_(0, pages, (mass * mass).sum(0))
    stats[COUNT].index_add_(0, pages, seen.sum(0).to(stats.dtype))
    stats[LAST, pages] = mass[-1]


@dataclasses.dataclass(frozen=True)
class PageAttentionStats:
    """The statistics of a request's full pages in one layer (``[num_pages]`` each), or of a
    batch of requests (``[rows, num_pages]``, padded), and the context a scoring rule may need.
    Scores are elementwise except where a rule ranks pages, along the last dimension."""

    total: torch.Tensor  # sum of masses over the queries seen so far
    squares: torch.Tensor  # sum of squared masses
    count: torch.Tensor  # queries that saw the page
    last: torch.Tensor  # mass from the latest query
    pinned: torch.Tensor  # bool: sinks and window, always kept
    budget_pages: int
    valid: torch.Tensor | None = None  # bool, False for padding (None: every page is real)

    @classmethod
    def from_tensor(cls, stats: torch.Tensor, num_pages: int, pinned: torch.Tensor,
                    budget_pages: int) -> "PageAttentionStats":
        s = stats[:, :num_pages]
        return cls(total=s[TOTAL], squares=s[SQUARES], count=s[COUNT], last=s[LAST],
                   pinned=pinned, budget_pages=budget_pages)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)

    @property
    def std(self) -> torch.Tensor:
        mean = self.mean
        return (self.squares / self.count.clamp(min=1) - mean * mean).clamp(min=0).sqrt()
