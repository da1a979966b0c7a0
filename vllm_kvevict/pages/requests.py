"""Per-request page state on a worker: which blocks a request owns and which page each holds."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from vllm_kvevict.pages.store import HostPageStore
from vllm_kvevict.paging import PageLayout, cdiv


@dataclasses.dataclass
class PageStats:
    """Cumulative counters. Pages backed up count each page once (all layers); evictions and
    recalls count page copies of one layer (of one KV head, with per-head selection)."""

    backed_up: int = 0
    evicted: int = 0
    recalled: int = 0
    selections: int = 0  # (request, step) pairs that selected pages


@dataclasses.dataclass
class RequestPages:
    """One request's pages on this worker.

    ``positions``/``block_ids`` list the blocks the request owns now (ascending positions);
    ``held[layer, i, h]`` is the logical page block ``block_ids[i]`` holds in that layer for
    KV head ``h`` (``heads`` is 1 when all heads of a block hold the same page).
    """

    host_ids: list[int] = dataclasses.field(default_factory=list)  # by logical page
    positions: list[int] = dataclasses.field(default_factory=list)
    block_ids: list[int] = dataclasses.field(default_factory=list)
    held: torch.Tensor | None = None
    num_tokens: int = 0  # tokens written after the last planned step
    # Attention-statistics policies: [layers, NUM_STATS, pages] by logical page.
    attention: torch.Tensor | None = None
    # Selecting policies with anchors: [layers, heads, A] pages kept since the prompt ended
    # (-1: none).
    anchors: torch.Tensor | None = None
    heads: int = 1  # page placements per block: 1, or one per KV head
    # Attention-statistics policies: decode queries held back (not yet observed) in slot
    # ``pending_slot`` of the runtime's store (-1: none assigned).
    pending_slot: int = -1
    num_pending: int = 0

    def own(self, positions: list[int], block_ids: list[int], num_layers: int) -> int:
        """Owned blocks become ``positions``/``block_ids``; returns page copies dropped.

        A block seen before at the same position keeps what it holds in every layer; a new one
        holds its own page (vLLM writes page ``p`` into position ``p``).
        """
        n = len(self.positions)
        if (self.held is not None and positions[:n] == self.positions
                and block_ids[:n] == self.block_ids):  # usual step: same blocks, maybe appended
            if len(positions) > n:
                appended = self._own_pages(positions[n:], num_layers)
                self.held = torch.cat([self.held, appended], dim=1)
                self.positions, self.block_ids = list(positions), list(block_ids)
            return 0
        before = {(p, b): i for i, (p, b) in enumerate(zip(self.positions, self.block_ids))}
        cols = [before.get(key, -1) for key in zip(positions, block_ids)]
        new_held = self._own_pages(positions, num_layers)
        kept = [(i, c) for i, c in enumerate(cols) if c >= 0]
        if kept and self.held is not None:
            dst, src = zip(*kept)
            new_held[:, list(dst)] = self.held[:, list(src)]
        dropped = len(self.positions) - len(kept)
        self.positions, self.block_ids, self.held = list(positions), list(block_ids), new_held
        return dropped * num_layers * self.heads

    def _own_pages(self, positions: list[int], num_layers: int) -> torch.Tensor:
        """``held`` of blocks that hold their own page in every layer and head."""
        pages = torch.tensor(positions, dtype=torch.int64).view(1, -1, 1)
        return pages.repeat(num_layers, 1, self.heads)


@dataclasses.dataclass
class RowInput:
    """One row of a step's batch, as the scheduler planned it."""

    req_id: str
    first_token: int  # index of the row's first query token in the batch
    num_computed: int  # tokens in the cache before this step
    num_new: int  # tokens computed in this step
    num_prompt: int
    block_row: Sequence[int]  # block id per logical position (at least the pages touched)


def own_row_blocks(state: RequestPages, row: RowInput, layout: PageLayout, num_layers: int,
                   stats: PageStats) -> tuple[range, list[int], list[int]]:
    """Make ``state`` own the blocks ``row`` holds after the scheduler's frees; returns the
    evicted page range, the owned positions and their block ids. Dropped page copies count as
    evicted."""
    seq_len = row.num_computed + row.num_new
    evicted = layout.evicted_pages(row.num_computed, row.num_computed < row.num_prompt)
    num_pages = cdiv(seq_len, layout.block_size)
    positions = [*range(min(evicted.start, num_pages)), *range(evicted.stop, num_pages)]
    blocks = [int(row.block_row[p]) for p in positions]
    stats.evicted += state.own(positions, blocks, num_layers)
    state.num_tokens = seq_len
    return evicted, positions, blocks


class RequestRegistry:
    """The page state of each request a worker runs.

    A request seen again with fewer computed tokens than its state records was preempted and is
    recomputed from scratch: its state (and host pages) are dropped and it starts over.
    Subclasses provide ``requests``, ``store`` and ``recalls`` (host pages held only if true),
    and may set ``page_heads`` (see :attr:`RequestPages.heads`).
    """

    requests: dict[str, RequestPages]
    store: HostPageStore
    recalls: bool
    page_heads: int = 1

    def release(self, req_id: str) -> None:
        """Forget a finished, aborted or preempted request and free its host pages."""
        state = self.requests.pop(req_id, None)
        if state is not None and self.recalls:
            self.store.release(state.host_ids)

    def _state_for(self, row: RowInput) -> RequestPages:
        state = self.requests.get(row.req_id)
        if state is not None and row.num_computed < state.num_tokens:
            self.release(row.req_id)
            state = None
        if state is None:
            state = self.requests[row.req_id] = RequestPages(heads=self.page_heads)
        return state
