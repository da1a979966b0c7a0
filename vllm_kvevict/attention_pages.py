"""The life of a page under an attention-statistics policy (H2O, TOVA, RoCo, SnapKV):
fill -> observe -> evict.

Plain torch; vLLM glue (``vllm_kvevict.engine``) only feeds it the batch and the KV cache.

* **Fill.** vLLM writes page ``p`` of a request into the block at position ``p`` of its table.
* **Observe.** After a layer's attention, the attention weights of the step's observing queries
  over the keys the kernel attended to are recomputed, reduced to a mass per page and added to the
  request's statistics in that layer (:mod:`vllm_kvevict.algorithms.attention_stats`). Observing
  queries: the last ``observation_window`` prompt queries when a prompt ends; each decode query,
  when the policy uses decode statistics.
* **Evict.** When the scheduler will free blocks after this step (all pages beyond the budget at
  the prompt's end; then the page leaving the recent window), each layer keeps the sinks, the
  window and the best-scored other pages: a kept page whose block is about to be freed is copied
  over the lowest-scored page of a block that stays. No host copies: evicted pages never return.

Because layers keep different pages, :class:`~vllm_kvevict.pages.RequestPages` records per layer
which page each owned block holds. Statistics are kept by logical page, so they survive moves.

Invariants (per request, per layer): between steps every owned block at a full position holds a
distinct page; sinks and window pages are held at their own positions; with nothing freed nothing
moves, so under a budget that covers the context the result is the stock computation.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from vllm_kvevict.algorithms.attention_stats import (COUNT, LAST, NUM_STATS, SQUARES, TOTAL,
                                                     PageAttentionStats, accumulate,
                                                     page_attention_mass)
from vllm_kvevict.algorithms.selection import topk_prefer_recent
from vllm_kvevict.pages import (BlockFormat, HostPageStore, PageStats, RequestPages,
                                RequestRegistry, RowInput, own_row_blocks)
from vllm_kvevict.paging import PageLayout, cdiv


@dataclasses.dataclass
class ObservedRow:
    """A row whose statistics are updated, or whose pages are evicted, in this step."""

    row: int
    state: RequestPages
    first_query: int  # batch index of the first observing query
    num_queries: int  # observing queries (0: evict on the statistics so far)
    num_tokens: int  # context length after this step
    num_full: int  # full pages after this step
    num_full_cols: int  # owned columns holding full pages (the page being filled excluded)
    blocks: torch.Tensor  # block id per owned column
    survivors: torch.Tensor | None  # full columns that stay owned; None: nothing is freed
    decode_index: int | None = None  # its row in the step's DecodeObservers, if any


class DecodeObservers:
    """The rows that observe one decode query in this step, as padded tensors built once per
    step: every layer observes them all at once.

    ``R`` rows, ``C`` the most owned columns, ``P`` the largest statistics capacity. ``held``
    copies the pages each column holds (page ``P`` in padding columns: its keys are never
    seen); ``stats`` ``[R, layers, NUM_STATS, P + 1]`` gathers the rows' statistics (column
    ``P`` absorbs the padding) and is written back after the last layer (:meth:`commit`).
    """

    def __init__(self, observers: list[ObservedRow], num_layers: int, device) -> None:
        rows = len(observers)
        num_cols = max(len(obs.state.block_ids) for obs in observers)
        capacity = max(obs.state.attention.shape[2] for obs in observers)
        self.observers = observers
        self.queries = torch.tensor([obs.first_query for obs in observers], device=device)
        self.positions = torch.tensor([obs.num_tokens - 1 for obs in observers], device=device)
        self.blocks = torch.zeros((rows, num_cols), dtype=torch.int64, device=device)
        self.held = torch.full((num_layers, rows, num_cols), capacity, dtype=torch.int64,
                               device=device)
        self.stats = torch.zeros((rows, num_layers, NUM_STATS, capacity + 1),
                                 dtype=torch.float32, device=device)
        for i, obs in enumerate(observers):
            cols, have = obs.blocks.numel(), obs.state.attention.shape[2]
            obs.decode_index = i
            self.blocks[i, :cols] = obs.blocks
            self.held[:, i, :cols] = obs.state.held.to(device)
            self.stats[i, :, :, :have] = obs.state.attention

    def commit(self) -> None:
        for i, obs in enumerate(self.observers):
            have = obs.state.attention.shape[2]
            obs.state.attention.copy_(self.stats[i, :, :, :have])


@dataclasses.dataclass
class StatsStepPlan:
    observed: list[ObservedRow]
    decode: DecodeObservers | None = None  # rows observing one decode query, batched
    per_row: list[ObservedRow] = dataclasses.field(default_factory=list)  # the others, evictions
    sparse_seq_lens: dict[int, int] = dataclasses.field(default_factory=dict)  # always empty

    @property
    def empty(self) -> bool:
        return not self.observed


class AttentionStatsRuntime(RequestRegistry):
    """Per-worker page bookkeeping of one KV-cache group under an attention-statistics policy."""

    recalls = False
    sparse_attention = False

    def __init__(self, layout: PageLayout, policy, block_format: BlockFormat, num_layers: int,
                 observation_window: int):
        self.layout = layout
        self.policy = policy
        self.format = block_format
        self.num_layers = num_layers
        self.observation_window = observation_window
        self.store = HostPageStore(0, num_layers)  # never bound: no host copies, no digests
        self.scale: float | None = None
        self.requests: dict[str, RequestPages] = {}
        self.stats = PageStats()

    @property
    def bound(self) -> bool:
        return self.scale is not None

    def bind(self, kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.scale = scale

    # --- per step ------------------------------------------------------------------------------

    def plan_step(self, rows: Sequence[RowInput], device) -> StatsStepPlan:
        """Update owned blocks and pick the rows that observe or evict in this step."""
        layout, bs = self.layout, self.layout.block_size
        observed = []
        for i, row in enumerate(rows):
            state = self._state_for(row)
            seq_len = row.num_computed + row.num_new
            prefilling = row.num_computed < row.num_prompt
            evicted, positions, blocks = own_row_blocks(state, row, layout, self.num_layers,
                                                        self.stats)
            num_pages = cdiv(seq_len, bs)
            if seq_len < row.num_prompt:
                continue  # mid-prompt chunk: full attention, nothing observed
            if prefilling:
                num_queries = min(self.observation_window, row.num_new)
            else:
                num_queries = 1 if self.policy.decode_statistics else 0
            after = layout.evicted_pages(seq_len, prefilling=False)
            frees = after.stop > max(evicted.stop, after.start)
            if not (num_queries or frees):
                continue
            self._grow(state, num_pages, device)
            num_full_cols = len(positions) - (1 if seq_len % bs else 0)
            survivors = None
            if frees:
                survivors = torch.tensor([c for c, p in enumerate(positions[:num_full_cols])
                                          if p not in after], dtype=torch.int64)
            observed.append(ObservedRow(
                row=i, state=state, first_query=row.first_token + row.num_new - num_queries,
                num_queries=num_queries, num_tokens=seq_len, num_full=seq_len // bs,
                num_full_cols=num_full_cols,
                blocks=torch.tensor(blocks, dtype=torch.int64, device=device),
                survivors=survivors))
        # Single-query observers (decode steps) are observed together; the others (a prompt's
        # observation window) and evictions row by row: each happens once per request or page.
        single = [obs for obs in observed if obs.num_queries == 1]
        decode = DecodeObservers(single, self.num_layers, device) if single else None
        per_row = [obs for obs in observed if obs.decode_index is None or obs.survivors is not None]
        return StatsStepPlan(observed, decode, per_row)

    def _grow(self, state: RequestPages, num_pages: int, device) -> None:
        have = 0 if state.attention is None else state.attention.shape[2]
        if have >= num_pages:
            return
        grown = torch.zeros((self.num_layers, NUM_STATS, max(num_pages, 2 * have)),
                            dtype=torch.float32, device=device)
        if have:
            grown[:, :, :have] = state.attention
        state.attention = grown

    # --- per layer -----------------------------------------------------------------------------

    def before_attention(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                         plan: StatsStepPlan) -> None:
        return None  # every row attends over all its resident pages

    def after_attention(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                        plan: StatsStepPlan) -> None:
        """Observe this step's queries (all decode rows at once), then evict where the scheduler
        will free blocks."""
        decode = plan.decode
        if decode is not None:
            self._observe_decode(layer, query, kv_cache, decode)
        for obs in plan.per_row:
            held = obs.state.held[layer]
            if obs.decode_index is None:
                stats = obs.state.attention[layer]
                if obs.num_queries:
                    self._observe(query, kv_cache, obs, held, stats)
            else:
                stats = decode.stats[obs.decode_index, layer]
            if obs.survivors is not None:
                self._evict(kv_cache, obs, held, stats)
        if decode is not None and layer == self.num_layers - 1:
            decode.commit()

    def _observe_decode(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                        decode: DecodeObservers) -> None:
        bs = self.layout.block_size
        held = decode.held[layer]  # [R, C]
        rows, cols = held.shape
        pages = self.format.read(kv_cache, decode.blocks.flatten())
        keys = self.format.keys(pages).unflatten(0, (rows, cols))  # [R, C, bs, kv, d]
        key_positions = held.unsqueeze(-1) * bs + torch.arange(bs, device=held.device)
        mass = page_attention_mass(query[decode.queries].unsqueeze(1), keys, key_positions,
                                   decode.positions.unsqueeze(1), self.scale)[:, 0]  # [R, C]
        seen = (key_positions[..., 0] <= decode.positions.unsqueeze(1)).float()
        stats = decode.stats[:, layer]  # [R, NUM_STATS, P + 1]
        stats[:, TOTAL].scatter_add_(1, held, mass)
        stats[:, SQUARES].scatter_add_(1, held, mass * mass)
        stats[:, COUNT].scatter_add_(1, held, seen)
        stats[:, LAST].scatter_(1, held, mass)

    def _observe(self, query, kv_cache, obs: ObservedRow, held, stats) -> None:
        bs = self.layout.block_size
        keys = self.format.keys(self.format.read(kv_cache, obs.blocks))
        key_positions = held.unsqueeze(1) * bs + torch.arange(bs)
        query_positions = torch.arange(obs.num_tokens - obs.num_queries, obs.num_tokens)
        queries = query[obs.first_query:obs.first_query + obs.num_queries]
        mass = page_attention_mass(queries, keys, key_positions.to(keys.device),
                                   query_positions.to(keys.device), self.scale)
        seen = key_positions[:, 0].unsqueeze(0) <= query_positions.unsqueeze(1)
        accumulate(stats, held, mass, seen)

    def _evict(self, kv_cache, obs: ObservedRow, held, stats) -> None:
        layout = self.layout
        cols = obs.num_full_cols
        pages = held[:cols]
        partial = obs.num_tokens % layout.block_size != 0
        window_full = layout.window_pages - (1 if partial else 0)
        pinned = (pages < layout.sink_pages) | (pages >= obs.num_full - window_full)
        view = PageAttentionStats(
            total=stats[0, pages], squares=stats[1, pages], count=stats[2, pages],
            last=stats[3, pages], pinned=pinned.to(stats.device), budget_pages=layout.budget_pages)
        scores = self.policy.score(view).float().cpu().masked_fill(pinned, float("inf"))
        num_kept = obs.survivors.numel()  # the budget's full pages
        by_page = torch.argsort(pages)
        kept = torch.zeros(cols, dtype=torch.bool)
        kept[by_page[topk_prefer_recent(scores[by_page], num_kept)]] = True
        stays = torch.zeros(cols, dtype=torch.bool)
        stays[obs.survivors] = True
        sources = (kept & ~stays).nonzero().squeeze(1)
        if not sources.numel():
            return
        free = (stays & ~kept).nonzero().squeeze(1)
        victims = free[torch.argsort(scores[free], stable=True)][:sources.numel()]
        if victims.numel() < sources.numel():
            raise RuntimeError("vllm-kvevict: fewer surviving blocks than kept pages")
        device = obs.blocks.device
        moved = self.format.read(kv_cache, obs.blocks[sources.to(device)])
        self.format.write(kv_cache, obs.blocks[victims.to(device)], moved)
        held[victims] = held[sources]
