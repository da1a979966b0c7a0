"""``roco``: robust cache omission (Ren & Zhu, 2024, arXiv:2402.06262; EasyKV's defaults).

Per page: mean attention ``mu = A / C`` and its standard deviation ``sigma`` over the queries
that saw the page. The ``int(std_ratio * budget)`` pages with the largest ``sigma`` (pinned
sinks and window count among them, their ``sigma`` being infinite; among equal ``sigma`` the
earlier candidate) are outside the eviction scope; inside it, pages are kept by ``mu``. Evicted
pages never return.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.attention_stats import PageAttentionStats
from vllm_kvevict.policies.base import AttentionStatsPolicy


@dataclasses.dataclass(frozen=True)
class RoCo(AttentionStatsPolicy):
    """Mean attention inside the low-variance scope."""

    name = "roco"
    std_ratio: float = 0.3  # EasyKV's decoding-time share of the budget kept by deviation

    def score(self, stats: PageAttentionStats) -> torch.Tensor:
        sigma = stats.std.masked_fill(stats.pinned, float("inf"))
        if stats.valid is not None:  # a padded batch: padding goes last
            sigma = sigma.masked_fill(~stats.valid, float("-inf"))
        protected = min(int(self.std_ratio * stats.budget_pages), sigma.shape[-1])
        # The largest deviations along the last dimension, the earlier entry first among equals.
        scope = torch.argsort(sigma, dim=-1, descending=True, stable=True)[..., :protected]
        return stats.mean.scatter(-1, scope, float("inf"))
