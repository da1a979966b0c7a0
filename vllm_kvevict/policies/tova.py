"""``tova``: token omission via attention (Oren et al., 2024, arXiv:2401.06104).

Keeps the pages the latest query attends to most: score = the last query's attention mass. TOVA
itself pins nothing; here the sinks and the recent window (the page being filled at least) stay,
as the paged mechanism requires. Pages leave only when a block is freed, and the score reads
only the query of that step, so decode queries are observed only in the steps their row evicts.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.attention_stats import PageAttentionStats
from vllm_kvevict.policies.base import AttentionStatsPolicy


@dataclasses.dataclass(frozen=True)
class TOVA(AttentionStatsPolicy):
    """Last query's attention."""

    name = "tova"
    latest_query_only = True

    def score(self, stats: PageAttentionStats) -> torch.Tensor:
        return stats.last
