"""Attention statistics of pages: what H2O, TOVA, RoCo, SnapKV, LRA and LFA rank pages by.

Fused attention kernels do not return attention weights, so they are recomputed here for the few
queries that feed the statistics (each decode query, the observation window at a prompt's end)
against the keys the kernel attended over.

Token to page: a page's attention mass for one query is the sum of the probabilities of its
tokens (GQA: probabilities averaged over the query heads of a group, as EasyKV does), averaged
over KV heads, because one block table serves every head of a layer. The statistics of a page are
then the token statistics of EasyKV applied to that mass: sum ``A``, sum of squares ``S`` and
count ``C`` of the queries that saw the page, and the last query's mass.

Attendre's statistics (LRA, LFA) count attendances. A query *attends* a page when the page gets
more than its even share of the query's attention: mass ``m > s / n`` for a page of which the
query sees ``s`` of its ``n`` visible tokens (for one token: a probability above ``1 / n``), with
a margin of :data:`EVEN_SHARE_MARGIN` so that exactly even attention (a query of zeros, equal keys)
attends nothing whatever the rounding. Per page: the number of queries that attended it, and its
latest use, the position of the last query that attended it, or of its first token when none has
(being written counts as a use, as in LRU caches).
"""
from __future__ import annotations

import dataclasses

import torch

# Rows of a statistics tensor ``[NUM_STATS, num_pages]`` (the sums first, in this order).
TOTAL, SQUARES, COUNT, ATTENDED, LAST, LAST_ATTENDED = range(6)
NUM_STATS = 6
NUM_SUMS = 4  # TOTAL .. ATTENDED: added up over queries
EVEN_SHARE_MARGIN = 1 + 1e-3  # attended: mass above 1.001 times the page's even share


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
                          query_positions: torch.Tensor, per_kv_head: bool = False) -> torch.Tensor:
    """:func:`page_attention_mass` from the scaled products ``scale * q . k``: ``logits``
    ``[..., n, num_kv_heads, group, pages * page_size]``, keys in page order, in any float
    dtype (the softmax is taken in float32). Returns ``[..., n, pages]`` float32, or
    ``[..., n, num_kv_heads, pages]`` (``per_kv_head``: no mean over KV heads)."""
    num_pages, page_size = key_positions.shape[-2:]
    seen = (key_positions.flatten(-2).to(query_positions.device).unsqueeze(-2)
            <= query_positions.unsqueeze(-1))                          # [..., n, t]
    logits = logits.masked_fill(~seen[..., :, None, None, :], float("-inf"))
    probs = logits.softmax(-1, dtype=torch.float32).unflatten(-1, (num_pages, page_size))
    # Tokens to pages, in one pass with the mean over the group's query heads (GQA); then the
    # mean over KV heads.
    mass = probs.sum((-3, -1)).div_(probs.shape[-3])
    return mass if per_kv_head else mass.mean(-2)


def attended(mass: torch.Tensor, seen_tokens: torch.Tensor) -> torch.Tensor:
    """Whether each query attends each page (see the module docstring): ``mass`` ``[..., cols]``
    from :func:`page_attention_mass`, ``seen_tokens`` ``[..., cols]`` the tokens of each page
    the query sees. Returns bool ``[..., cols]``."""
    seen_tokens = seen_tokens.to(mass.dtype)
    visible = seen_tokens.sum(-1, keepdim=True)
    return mass * visible > seen_tokens * EVEN_SHARE_MARGIN


def latest_use(is_attended: torch.Tensor, seen_tokens: torch.Tensor,
               query_positions: torch.Tensor, page_starts: torch.Tensor) -> torch.Tensor:
    """Each query's candidate for ``LAST_ATTENDED`` (the statistic is the maximum over queries):
    the query's position where it attends the page, else the page's first position where it
    sees the page, else 0. ``[..., n, cols]`` float32 from bool ``is_attended`` and int
    ``seen_tokens`` ``[..., n, cols]``, ``query_positions`` ``[..., n]``, ``page_starts``
    ``[..., cols]`` (or ``[..., n, cols]``)."""
    starts = page_starts.expand_as(seen_tokens).float()
    use = torch.where(seen_tokens > 0, starts, torch.zeros_like(starts))
    return torch.where(is_attended, query_positions.unsqueeze(-1).float(), use)


def accumulate(stats: torch.Tensor, pages: torch.Tensor, mass: torch.Tensor,
               key_positions: torch.Tensor, query_positions: torch.Tensor) -> None:
    """Add queries' masses to the statistics of ``pages``.

    Args:
        stats: ``[NUM_STATS, capacity]`` of one request and layer, by logical page.
        pages: ``[cols]`` logical page of each column of ``mass``.
        mass: ``[n, cols]`` from :func:`page_attention_mass`, queries in order.
        key_positions: ``[cols, page_size]`` token positions of each column's keys (as given
            to :func:`page_attention_mass`).
        query_positions: ``[n]``.
    """
    mass = mass.to(stats.device)
    pages = pages.to(stats.device)
    key_positions = key_positions.to(stats.device)
    query_positions = query_positions.to(stats.device)
    seen_tokens = (key_positions.unsqueeze(0)
                   <= query_positions[:, None, None]).sum(-1)              # [n, cols]
    hit = attended(mass, seen_tokens)
    stats[TOTAL].index_add_(0, pages, mass.sum(0))
    stats[SQUARES].index_add_(0, pages, (mass * mass).sum(0))
    stats[COUNT].index_add_(0, pages, (seen_tokens > 0).sum(0).to(stats.dtype))
    stats[ATTENDED].index_add_(0, pages, hit.sum(0).to(stats.dtype))
    stats[LAST, pages] = mass[-1]
    use = latest_use(hit, seen_tokens, query_positions, key_positions[:, 0]).amax(0)
    stats[LAST_ATTENDED].scatter_reduce_(0, pages, use, "amax")


@dataclasses.dataclass(frozen=True)
class PageAttentionStats:
    """The statistics of a request's full pages in one layer (``[num_pages]`` each), or of a
    batch of requests (``[rows, num_pages]``, padded), and the context a scoring rule may need.
    Scores are elementwise except where a rule ranks pages, along the last dimension."""

    total: torch.Tensor  # sum of masses over the queries seen so far
    squares: torch.Tensor  # sum of squared masses
    count: torch.Tensor  # queries that saw the page
    attended: torch.Tensor  # queries that attended the page (above its even share)
    last: torch.Tensor  # mass from the latest query
    last_attended: torch.Tensor  # position of its latest use (attended, else written)
    pinned: torch.Tensor  # bool: sinks and window, always kept
    budget_pages: int
    valid: torch.Tensor | None = None  # bool, False for padding (None: every page is real)

    @classmethod
    def of(cls, stats: torch.Tensor, pinned: torch.Tensor, budget_pages: int,
           valid: torch.Tensor | None = None) -> "PageAttentionStats":
        """From a statistics tensor ``[..., NUM_STATS, pages]`` already gathered by page."""
        s = stats.unbind(-2)
        return cls(total=s[TOTAL], squares=s[SQUARES], count=s[COUNT], attended=s[ATTENDED],
                   last=s[LAST], last_attended=s[LAST_ATTENDED], pinned=pinned,
                   budget_pages=budget_pages, valid=valid)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)

    @property
    def std(self) -> torch.Tensor:
        mean = self.mean
        return (self.squares / self.count.clamp(min=1) - mean * mean).clamp(min=0).sqrt()
