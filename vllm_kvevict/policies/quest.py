"""``quest``: query-aware sparse attention (Tang et al., ICML 2024, arXiv:2406.10774).

Every page stays resident (no memory saving). Each decode step, per layer, pages are scored by
their min/max key digest, ``sum_d max(q_d * max_d, q_d * min_d)`` (mean over query heads, one
ranking per layer), and attention reads only the sinks, the recent window and the top-k pages:
``--kv-budget`` is the number of tokens attended per step; the digest is always ``cuboid-max``.
Differences from the paper: a page is a vLLM block (32 tokens), and the
sink and window pages are always attended (Quest itself keeps the first two layers dense).
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_kvevict.algorithms.digest import score_pages
from vllm_kvevict.policies.base import PageSelectionPolicy


@dataclasses.dataclass(frozen=True)
class Quest(PageSelectionPolicy):
    """Min/max digest upper bounds; all pages resident, attention over the selection."""

    name = "quest"
    recalls = False
    digest = "cuboid-max"

    digest_bound_score = True

    def score(self, query: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return score_pages(query, hi, lo, per_kv_head=False)
