"""The policy interface shared by all eviction policies."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm_kvevict.algorithms.attention_stats import PageAttentionStats


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
    """One eviction policy.

    A policy says which pages a request attends over once its prompt is processed. The
    mechanism (which blocks the scheduler frees, how the backend compacts block tables) lives in
    :mod:`vllm_kvevict.paging` and :mod:`vllm_kvevict.engine`; a policy never touches the pool.

    Attributes:
        name: the value of ``--kv-eviction-policy``.
        evicts: whether the policy caps resident blocks (``none`` does not).
        selects: whether a worker-side page runtime decides, per layer, which logical page each
            owned block holds (:mod:`vllm_kvevict.pages`): selecting policies and
            attention-statistics policies; otherwise resident pages are fixed by position.
    """

    name: ClassVar[str]
    evicts: ClassVar[bool] = True
    selects: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class PageSelectionPolicy(EvictionPolicy):
    """A policy that ranks every filled page per step by one scoring rule.

    The runtime keeps sinks and the recent window, adds the ``top_k`` best-scored pages, recalls
    those not resident and attends (see :mod:`vllm_kvevict.pages`).
    """

    selects: ClassVar[bool] = True
    # True: pages beyond the budget leave the device (backed up, recalled when selected).
    # False: every page stays resident and only attention is restricted to the selection.
    recalls: ClassVar[bool] = True
    digest: ClassVar[str | None] = None  # a digest kind the policy requires (else --kv-digest)
    # True: ``score`` is the digest upper bound averaged over all query heads
    # (``score_pages(per_kv_head=False)``), which the CUDA scoring kernel computes.
    digest_bound_score: ClassVar[bool] = False
    # True: the budget left besides sinks, window and top-k holds, per layer, the prompt pages
    # the last prompt queries attend to most (exact attention when the prompt ends), kept for
    # the request's life (recalling policies without sparse attention).
    anchors_observed_pages: ClassVar[bool] = False

    def keeps_anchors(self, sparse_attention: bool, observation_window: int) -> bool:
        """Whether, with these settings, the budget left besides sinks, window and top-k holds
        anchors."""
        return (self.anchors_observed_pages and self.recalls and not sparse_attention
                and observation_window > 0)

    def score(self, query: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """``[num_pages]`` scores (higher = keep) of pages with digests ``hi``/``lo``
        (``[num_pages, num_kv_heads, head_dim]``) for one query ``[num_q_heads, head_dim]``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AttentionStatsPolicy(EvictionPolicy):
    """A policy that evicts pages for good, per layer, ranked by attention statistics.

    No host copies: when the budget is exceeded the runtime keeps sinks, the window and the
    best-scored other pages (see :mod:`vllm_kvevict.attention_pages`); a page evicted in one
    layer may stay in another.
    """

    selects: ClassVar[bool] = True
    # True: every decode query updates the statistics; False: only the observation window at
    # the prompt's end does (SnapKV).
    decode_statistics: ClassVar[bool] = True
    # True: the rule reads only the latest query's masses (TOVA), so a decode query is observed
    # only in the steps its row evicts: the same choices, none of the other steps' work.
    latest_query_only: ClassVar[bool] = False

    def score(self, stats: PageAttentionStats) -> torch.Tensor:
        """``[num_pages]`` scores (higher = keep) of the candidate pages described by ``stats``;
        pinned pages are kept whatever their score."""
        raise NotImplementedError
