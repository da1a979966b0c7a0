"""``lra``: least recently attended (Yang & Hua, Attendre, 2024, arXiv:2401.04881).

Attendre bounds a memory of keys and values by evicting the entry attended least recently. Here:
a query *attends* a page when the page gets more than its even share of the query's attention
(mass above ``s / n`` for ``s`` of the ``n`` tokens the query sees; see
:mod:`vllm_kvevict.algorithms.attention_stats`), and score = the position of the page's latest
use: the last query that attended it, or its first token if none has yet (being written counts
as a use, as in an LRU cache, so a page just out of the window is not behind every old page).
Uses are recorded by the prompt's observation window and every decode query. Sinks and the
recent window stay; among equal scores (pages attended by the same query) the more recent page
stays. Evicted pages never return.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.attention_stats import PageAttentionStats
from vllm_kvevict.policies.base import AttentionStatsPolicy


@dataclasses.dataclass(frozen=True)
class LRA(AttentionStatsPolicy):
    """Latest attendance."""

    name = "lra"

    def score(self, stats: PageAttentionStats) -> torch.Tensor:
        return stats.last_attended
