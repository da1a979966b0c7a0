"""``h2o``: heavy-hitter oracle (Zhang et al., NeurIPS 2023, arXiv:2306.14048).

Keeps the pages that received the most attention so far: score = accumulated attention mass
``A`` (every decode query since the prompt's end, seeded by the prompt's observation window),
plus sinks and the recent window. Evicted pages never return.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.attention_stats import PageAttentionStats
from vllm_kvevict.policies.base import AttentionStatsPolicy


@dataclasses.dataclass(frozen=True)
class H2O(AttentionStatsPolicy):
    """Accumulated attention."""

    name = "h2o"

    def score(self, stats: PageAttentionStats) -> torch.Tensor:
        return stats.total
