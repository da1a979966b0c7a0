"""``lfa``: least frequently attended (Yang & Hua, Attendre, 2024, arXiv:2401.04881).

Attendre's other eviction rule: evict the entry attended least often. Here: a query *attends* a
page when the page gets more than its even share of the query's attention (mass above ``s / n``
for ``s`` of the ``n`` tokens the query sees; see :mod:`vllm_kvevict.algorithms.attention_stats`),
and score = the number of queries that attended it (the prompt's observation window and every
decode query since). Unlike h2o's sum of masses, a query counts once per page however much it
attends. Sinks and the recent window stay; among equal counts the more recent page stays.
Evicted pages never return.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.attention_stats import PageAttentionStats
from vllm_kvevict.policies.base import AttentionStatsPolicy


@dataclasses.dataclass(frozen=True)
class LFA(AttentionStatsPolicy):
    """Attendance count."""

    name = "lfa"

    def score(self, stats: PageAttentionStats) -> torch.Tensor:
        return stats.attended
