"""Which pages of a request stay resident under a per-request KV budget.

A page is one vLLM KV-cache block of ``block_size`` tokens. Once a request's prompt is processed,
its resident pages are laid out as::

    logical page:  0 .. S-1 | S ........ E-1 | E ............ F-1 | F
                   sinks    | evicted (freed)| most recent full   | page being filled
                   (S)      |                | pages (B - S)      | (the decode token)

with ``B`` the budget in pages, ``S`` the sink pages and ``F`` the number of full pages, so at
most ``B + 1`` blocks are held. The scheduler (which frees blocks) and the attention backend (which
compacts the block table) both derive the evicted range from the same two numbers, the tokens
already computed and whether the request is still prefilling, so they always agree without
exchanging messages. The range only grows as a request advances.
"""
from __future__ import annotations

import dataclasses

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Integer dtypes by width in bytes: pages are moved bit for bit through same-width integer views.
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """A token budget expressed in pages.

    ``top_k_pages`` is what selecting policies pick per step besides the sinks and the window
    (the window counts the page being filled).

    Invariant: ``sink_pages + window_pages + top_k_pages <= budget_pages``.
    """

    block_size: int
    budget_pages: int
    sink_pages: int
    window_pages: int
    top_k_pages: int = 0

    def __post_init__(self) -> None:
        from vllm_kvevict.config import EvictionConfigError

        if self.sink_pages + self.window_pages > self.budget_pages:
            raise EvictionConfigError(
                f"--kv-budget holds {self.budget_pages} blocks of {self.block_size} tokens, fewer "
                f"than {self.sink_pages} sink + {self.window_pages} window blocks; "
                "raise --kv-budget")
        if self.sink_pages + self.window_pages + self.top_k_pages > self.budget_pages:
            raise EvictionConfigError(
                f"--kv-top-k-tokens is {self.top_k_pages} blocks of {self.block_size} tokens, but "
                f"--kv-budget ({self.budget_pages} blocks) leaves "
                f"{self.budget_pages - self.sink_pages - self.window_pages} besides "
                f"{self.sink_pages} sink + {self.window_pages} window blocks")

    @classmethod
    def from_tokens(cls, block_size: int, budget: int, sink_tokens: int, window_tokens: int,
                    top_k_tokens: int | None = None,
                    top_k_share: float | None = None) -> "PageLayout":
        """Budget rounded down, sinks and window rounded up, to whole pages.

        ``top_k_tokens=None`` picks ``min(1280, budget * top_k_share)`` tokens (ArkVale's rule;
        ``top_k_share=None``: its half), capped to the pages the budget leaves besides sinks and
        window; a given value is rounded down.
        """
        budget_pages = budget // block_size
        sink_pages = cdiv(sink_tokens, block_size)
        window_pages = cdiv(window_tokens, block_size)
        if top_k_tokens is None:
            from vllm_kvevict.config import DEFAULT_TOP_K_SHARE, MAX_DEFAULT_TOP_K_TOKENS

            share = DEFAULT_TOP_K_SHARE if top_k_share is None else top_k_share
            top_k_pages = min(MAX_DEFAULT_TOP_K_TOKENS, int(budget * share)) // block_size
            top_k_pages = max(0, min(top_k_pages, budget_pages - sink_pages - window_pages))
        else:
            top_k_pages = top_k_tokens // block_size
        return cls(block_size=block_size, budget_pages=budget_pages, sink_pages=sink_pages,
                   window_pages=window_pages, top_k_pages=top_k_pages)

    def selected_pages(self, num_full_pages: int, has_partial_page: bool) -> int:
        """How many full pages a selecting policy attends over (sinks + top-k + window)."""
        window_full = self.window_pages - (1 if has_partial_page else 0)
        return min(num_full_pages, self.sink_pages + window_full + self.top_k_pages)

    @property
    def max_resident_pages(self) -> int:
        """Blocks a request holds at most after prefill: the budget plus the page being filled."""
        return self.budget_pages + 1

    def evicted_pages(self, num_computed_tokens: int, prefilling: bool) -> range:
        """Logical pages no longer resident after ``num_computed_tokens`` tokens.

        Nothing is evicted while the prompt is being prefilled (full attention over the prompt).
        """
        start = self.sink_pages
        if prefilling:
            return range(start, start)
        num_full_pages = num_computed_tokens // self.block_size
        end = max(start, num_full_pages - (self.budget_pages - self.sink_pages))
        return range(start, end)

    def num_evicted_pages(self, num_computed_tokens: torch.Tensor,
                          prefilling: torch.Tensor) -> torch.Tensor:
        """Batched ``len(evicted_pages(...))``: ``[num_reqs]`` int64."""
        kept_recent = self.budget_pages - self.sink_pages
        num_full = num_computed_tokens.to(torch.int64) // self.block_size
        num_evicted = torch.clamp(num_full - kept_recent - self.sink_pages, min=0)
        return torch.where(prefilling, torch.zeros_like(num_evicted), num_evicted)

    def compact_block_table(
        self,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_lens: torch.Tensor,
        prefilling: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop each row's evicted pages from a batch's block table.

        Args:
            block_table: ``[num_reqs, max_pages]`` int block ids in logical page order.
            seq_lens: ``[num_reqs]`` tokens in the context including this step's queries.
            query_lens: ``[num_reqs]`` tokens computed in this step.
            prefilling: ``[num_reqs]`` bool, True while the row's prompt is not yet processed.

        Returns:
            ``(compact_table, compact_seq_lens)``: each row lists its resident pages in logical
            order (sinks, then recent pages) and its length shrinks by the evicted tokens. Keys
            keep their original positions, so attending over the compact row is attending over
            exactly the resident tokens. Columns past a row's new length are unspecified.
        """
        num_evicted = self.num_evicted_pages(seq_lens - query_lens, prefilling)
        max_pages = block_table.shape[1]
        cols = torch.arange(max_pages, device=block_table.device).unsqueeze(0)
        src = torch.where(cols < self.sink_pages, cols, cols + num_evicted.unsqueeze(1))
        src = src.clamp(max=max_pages - 1)
        compact = torch.gather(block_table, 1, src).to(block_table.dtype)
        new_seq_lens = (seq_lens - num_evicted * self.block_size).to(seq_lens.dtype)
        return compact, new_seq_lens
