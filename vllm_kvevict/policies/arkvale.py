"""``arkvale``: recallable page eviction (Chen et al., NeurIPS 2024).

Every filled page is backed up to host memory and summarised by a digest of its post-RoPE keys
(a box ``[lo, hi]`` per KV head). Each decode step, per layer, every filled page of the request,
resident or not, is scored against the query by ``sum_d max(q_d * hi_d, q_d * lo_d)`` (mean over
query heads: one ranking per layer); the sinks, the recent window and the ``top_k`` best pages are
made resident (recalling from host over the lowest-scored resident pages) and attended over.
The mechanism lives in :mod:`vllm_kvevict.pages`; this module is only the scoring rule.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.digest import score_pages
from vllm_kvevict.policies.base import PageSelectionPolicy


@dataclasses.dataclass(frozen=True)
class ArkVale(PageSelectionPolicy):
    """Digest upper-bound scores, one ranking per layer (mean over all query heads)."""

    name = "arkvale"

    digest_bound_score = True
    anchors_observed_pages = True

    def score(self, query: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return score_pages(query, hi, lo, per_kv_head=False)
