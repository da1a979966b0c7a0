"""``snapkv``: observation-window selection at the prompt's end (Li et al., 2024, arXiv:2404.14469).

When the prompt is processed, the last ``--kv-observation-window`` prompt queries (32 by default)
vote: each page scores the attention mass they give it, and the budget keeps sinks, window and
the best-voted pages; the rest is evicted for good. Decode queries do not vote, so afterwards the
kept prompt pages stay and pages generated later leave with the recent window (the budget holds;
SnapKV itself lets the cache grow during decoding). SnapKV's max-pooling over neighbouring tokens
is subsumed by the page: a page keeps its 32 neighbouring tokens together.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.attention_stats import PageAttentionStats
from vllm_kvevict.policies.base import AttentionStatsPolicy


@dataclasses.dataclass(frozen=True)
class SnapKV(AttentionStatsPolicy):
    """Observation-window votes, once."""

    name = "snapkv"
    decode_statistics = False

    def score(self, stats: PageAttentionStats) -> torch.Tensor:
        return stats.total
