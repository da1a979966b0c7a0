"""The life of a page under an attention-statistics policy (H2O, TOVA, RoCo, SnapKV, LRA, LFA):
fill -> observe -> evict.

Plain torch; vLLM glue (``vllm_kvevict.engine``) only feeds it the batch and the KV cache.

* **Fill.** vLLM writes page ``p`` of a request into the block at position ``p`` of its table.
* **Observe.** After a layer's attention, the attention weights of the step's observing queries
  over the keys the kernel attended to are recomputed, reduced to a mass per page and added to the
  request's statistics in that layer (:mod:`vllm_kvevict.algorithms.attention_stats`). Observing
  queries: the last ``observation_window`` prompt queries when a prompt ends; each decode query,
  when the policy uses decode statistics (only those of evicting steps, when its rule reads the
  latest query alone). On CPU a row's decode queries are held back and observed together when
  it evicts (or holds a block's worth): nothing moved since its last eviction, so each held-back
  query, masked by position, sees the keys it attended to, and one pass over a row's keys serves
  up to a block of steps.
* **Evict.** When the scheduler will free blocks after this step (all pages beyond the budget at
  the prompt's end; then the page leaving the recent window), each layer keeps the sinks, the
  window and the best-scored other pages: a kept page whose block is about to be freed is copied
  over the lowest-scored page of a block that stays. No host copies: evicted pages never return.

Because layers keep different pages, :class:`~vllm_kvevict.pages.RequestPages` records per layer
which page each owned block holds. Statistics are kept by logical page, so they survive moves.

Each step is planned once on the host (:class:`StatsBatch`: padded tensors, each moved to the
device once); each layer then observes (one attention-mass pass over every observing query: the
products with the keys in torch, then, on CPU, softmax, page sums and the statistics update in one
compiled call) and evicts (one ranking and one masked block copy) for all rows at once, with no
host sync; the requests' statistics and page tables are written back after the last layer.

Invariants (per request, per layer): between steps every owned block at a full position holds a
distinct page; sinks and window pages are held at their own positions; with nothing freed nothing
moves, so under a budget that covers the context the result is the stock computation.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Sequence

import torch
from torch import nn

from vllm_kvevict.algorithms.attention_stats import NUM_STATS, PageAttentionStats
from vllm_kvevict.algorithms.selection import keep_mask
from vllm_kvevict.pages import (BlockFormat, HostPageStore, PageStats, RequestPages,
                                RequestRegistry, RowInput, own_row_blocks)
from vllm_kvevict.pages.keys import BlockKeys
from vllm_kvevict.pages.ops import PageOps, page_ops_for
from vllm_kvevict.pages.plan import to_device
from vllm_kvevict.paging import PageLayout, cdiv


@dataclasses.dataclass
class ObservedRow:
    """A row whose statistics are updated, or whose pages are evicted, in this step (host data,
    what :class:`StatsBatch` stacks)."""

    row: int
    state: RequestPages
    first_query: int  # batch index of the first observing query
    num_queries: int  # observing queries (0: evict on the statistics so far)
    num_tokens: int  # context length after this step
    num_full: int  # full pages after this step
    num_full_cols: int  # owned columns holding full pages (the page being filled excluded)
    blocks: list[int]  # block id per owned column
    survivors: list[int] | None  # full columns that stay owned; None: nothing is freed
    pending_slot: int | None = None  # queries held back in this slot (else: in the step's batch)


class StatsBatch:
    """The step's observing and evicting rows as padded tensors, built on the host once per step
    and moved to the device once; every layer observes and evicts them all at once.

    ``R`` rows, ordered: rows observing one query (decode rows), rows observing a prompt's
    window (several queries), rows that only evict. ``C`` the most owned columns, ``P`` the
    largest statistics capacity.

    * ``blocks`` ``[R, C]``: block per owned column (block 0 in padding columns, whose keys are
      never seen).
    * ``held`` ``[layers, R, C]``: the page each column holds (page ``P`` in padding columns: its
      keys lie past every query); updated by the layers' moves.
    * ``stats`` ``[layers, R, NUM_STATS, P + 1]``: the rows' statistics (column ``P`` absorbs
      the padding), updated by the layers.
    * Observing queries: ``single_query`` ``[R_1]`` (the query of each one-query row) and
      ``window_query`` ``[R_w, Q]`` (each window row's queries, padded with its last one:
      the first ``num_prompt_windows`` rows' index the step's queries, the others' the runtime's
      held-back queries, ``[slots * pending_queries]`` flattened);
      ``single_cols``/``window_cols`` the columns each group reads. All their real queries in
      one list (one-query rows', then each window's in order; ``window_rows``/``window_slots``
      pick them from ``window_query``): ``query_rows`` (their row), ``query_positions``, and
      ``last_query`` ``[R_1 + R_w]`` (each row's last one).
    * Evicting rows ``evict_rows`` ``[R_e]``: ``full`` ``[R_e, C]`` (columns holding full
      pages), ``stays`` (full columns that stay owned), ``num_keep`` (how many stay: the pages
      kept), ``window_start`` (the first pinned window page); ``max_moves`` bounds the pages a row
      moves (a kept page in a freed block goes over a page not kept in a block that stays: as
      many of one as of the other).

    :meth:`commit` writes statistics and page tables back to the requests after the last layer.
    """

    def __init__(self, observed: list[ObservedRow], layout: PageLayout, num_layers: int,
                 device, pending_queries: int = 0) -> None:
        single = [obs for obs in observed if obs.num_queries == 1]
        window = ([obs for obs in observed if obs.num_queries > 1 and obs.pending_slot is None]
                  + [obs for obs in observed if obs.num_queries > 1
                     and obs.pending_slot is not None])
        self.num_prompt_windows = sum(obs.pending_slot is None for obs in window)
        order = single + window + [obs for obs in observed if obs.num_queries == 0]
        self.rows = order
        self.num_single, self.num_observing = len(single), len(single) + len(window)
        rows = len(order)
        num_cols = max(len(obs.blocks) for obs in order)
        capacity = max(obs.state.attention.shape[2] for obs in order)
        blocks = torch.zeros((rows, num_cols), dtype=torch.int64)
        held = torch.full((num_layers, rows, num_cols), capacity, dtype=torch.int64)
        for i, obs in enumerate(order):
            blocks[i, :len(obs.blocks)] = torch.tensor(obs.blocks)
            held[:, i, :len(obs.blocks)] = obs.state.held[..., 0]
        host = {"blocks": blocks, "held": held}  # moved to the device in one copy, below
        # Statistics live on the device: gathered there (no host copy).
        self.stats = torch.zeros((num_layers, rows, NUM_STATS, capacity + 1), dtype=torch.float32,
                                 device=device)
        for i, obs in enumerate(order):
            self.stats[:, i, :, :obs.state.attention.shape[2]] = obs.state.attention

        # Observing queries: the one-query rows', then each window row's, in order.
        width = max((obs.num_queries for obs in window), default=0)
        window_query = torch.zeros((len(window), width), dtype=torch.int64)
        window_rows, window_slots, query_rows, query_positions, last_query = [], [], [], [], []
        for i, obs in enumerate(order[:self.num_observing]):
            n = obs.num_queries
            if n > 1:  # a window row: its queries, then its last one again
                j = i - len(single)
                first = (obs.first_query if obs.pending_slot is None
                         else obs.pending_slot * pending_queries)
                window_query[j] = first + torch.arange(width).clamp(max=n - 1)
                window_rows += [j] * n
                window_slots += range(n)
            query_rows += [i] * n
            query_positions += range(obs.num_tokens - n, obs.num_tokens)
            last_query.append(len(query_rows) - 1)
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.int64)  # noqa: E731
        # For compiled observation: row i's queries at row_starts[i]:row_starts[i + 1], its
        # columns.
        observing = order[:self.num_observing]
        host.update(row_starts=as_tensor([0] + [obs.num_queries for obs in observing]).cumsum(0),
                    row_cols=as_tensor([len(obs.blocks) for obs in observing]))
        host.update(single_query=as_tensor([obs.first_query for obs in single]),
                    window_query=window_query, window_rows=as_tensor(window_rows),
                    window_slots=as_tensor(window_slots))
        self.single_cols = max((len(obs.blocks) for obs in single), default=0)
        self.window_cols = max((len(obs.blocks) for obs in window), default=0)
        host.update(query_rows=as_tensor(query_rows), query_positions=as_tensor(query_positions),
                    last_query=as_tensor(last_query))

        evicting = [(i, obs) for i, obs in enumerate(order) if obs.survivors is not None]
        self.num_evicting = len(evicting)
        full = torch.zeros((len(evicting), num_cols), dtype=torch.bool)
        stays = torch.zeros((len(evicting), num_cols), dtype=torch.bool)
        window_start = []
        self.max_moves = 0
        for i, (_, obs) in enumerate(evicting):
            full[i, :obs.num_full_cols] = True
            stays[i, obs.survivors] = True
            window_full = layout.window_pages - (1 if obs.num_tokens % layout.block_size else 0)
            window_start.append(obs.num_full - window_full)
            num_keep = len(obs.survivors)
            self.max_moves = max(self.max_moves, min(num_keep, obs.num_full_cols - num_keep))
        host.update(evict_rows=as_tensor([i for i, _ in evicting]), full=full, stays=stays,
                    num_keep=stays.sum(1), window_start=as_tensor(window_start))
        moved = to_device(host, device)
        self.blocks, self.held = moved["blocks"], moved["held"]
        self.single_query, self.window_query = moved["single_query"], moved["window_query"]
        self.window_rows, self.window_slots = moved["window_rows"], moved["window_slots"]
        self.query_rows, self.query_positions = moved["query_rows"], moved["query_positions"]
        self.last_query, self.evict_rows = moved["last_query"], moved["evict_rows"]
        self.full, self.stays, self.num_keep = moved["full"], moved["stays"], moved["num_keep"]
        self.window_start = moved["window_start"]
        self.row_starts, self.row_cols = moved["row_starts"], moved["row_cols"]
        self._arrays: types.SimpleNamespace | None = None

    @property
    def arrays(self) -> types.SimpleNamespace:
        """Numpy views of the tensors compiled CPU code reads and updates (CPU only)."""
        if self._arrays is None:
            self._arrays = types.SimpleNamespace(
                row_starts=self.row_starts.numpy(), query_positions=self.query_positions.numpy(),
                row_cols=self.row_cols.numpy(), held=self.held.numpy(), stats=self.stats.numpy())
        return self._arrays

    def commit(self) -> None:
        """Write the observing rows' statistics (on the device) and the evicting rows' page
        tables (one device-to-host copy) back to the requests."""
        for i, obs in enumerate(self.rows[:self.num_observing]):
            obs.state.attention.copy_(self.stats[:, i, :, :obs.state.attention.shape[2]])
        if self.num_evicting:
            held = self.held.cpu()
            for i, obs in enumerate(self.rows):
                if obs.survivors is not None:
                    obs.state.held[..., 0].copy_(held[:, i, :obs.state.held.shape[1]])


def default_pending_queries(policy, layout: PageLayout, device) -> int:
    """Decode queries a row holds back: on CPU a block's worth (a row evicts at most once per
    block of steps; one gather of its keys out of the CPU kernels' tiled layout then serves them
    all); elsewhere 1, each observed in its own step (keys read through a strided view, and no
    store of queries beside the KV cache, whose size vLLM's memory profiling does not count)."""
    if (torch.device(device).type != "cpu" or not policy.decode_statistics
            or policy.latest_query_only):
        return 1
    return layout.block_size


@dataclasses.dataclass
class StatsStepPlan:
    """What every layer does in one step (built once per step, read by every layer)."""

    observed: list[ObservedRow]
    batch: StatsBatch | None = None  # the observed rows as tensors (None: no row)
    sparse_seq_lens: dict[int, int] = dataclasses.field(default_factory=dict)  # always empty
    # Decode queries held back in this step: their index in the batch and their place in the
    # runtime's store (slot * pending_queries + order).
    held_back: dict[str, torch.Tensor] | None = None

    @property
    def empty(self) -> bool:
        return not self.observed and self.held_back is None

    @property
    def has_layer_work(self) -> bool:
        """The layers have page work (the backend attaches the plan to the step only then)."""
        return not self.empty


class AttentionStatsRuntime(RequestRegistry):
    """Per-worker page bookkeeping of one KV-cache group under an attention-statistics policy."""

    recalls = False
    sparse_attention = False

    def __init__(self, layout: PageLayout, policy, block_format: BlockFormat, num_layers: int,
                 observation_window: int, ops: PageOps | None = None,
                 pending_queries: int | None = None):
        self.layout = layout
        self.policy = policy
        self.format = block_format
        self.num_layers = num_layers
        self.observation_window = observation_window
        # Decode queries of a row held back and observed together, when the row evicts or holds
        # this many (1: each in its own step; None: chosen by the device at the first plan).
        # Nothing moves between a row's evictions, so a held-back query sees the keys it
        # attended to, masked by position: the same masses.
        self.pending_queries = pending_queries
        self.pending: torch.Tensor | None = None  # [layers, slots, pending_queries, heads, dim]
        self._free_slots: list[int] = []
        self._num_slots = 0
        self.store = HostPageStore(0, num_layers)  # never bound: no host copies, no digests
        self.scale: float | None = None
        self.requests: dict[str, RequestPages] = {}
        self.stats = PageStats()
        self._keys: BlockKeys | None = None  # how to read keys from the cache, found on first use
        self.ops = ops  # page copies (masked, no host sync off the CPU); chosen at the first plan

    @property
    def selections(self) -> int:
        """(request, step) pairs that ranked pages for eviction so far."""
        return self.stats.selections

    @property
    def bound(self) -> bool:
        return self.scale is not None

    def bind(self, kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.scale = scale
        self._keys = None  # the format may have changed with the cache

    def release(self, req_id: str) -> None:
        state = self.requests.get(req_id)
        if state is not None and state.pending_slot >= 0:
            self._free_slots.append(state.pending_slot)
        super().release(req_id)

    def _slot_for(self, state: RequestPages) -> int:
        if state.pending_slot < 0:
            if self._free_slots:
                state.pending_slot = self._free_slots.pop()
            else:
                state.pending_slot, self._num_slots = self._num_slots, self._num_slots + 1
        return state.pending_slot

    # --- per step ------------------------------------------------------------------------------

    def plan_step(self, rows: Sequence[RowInput], device) -> StatsStepPlan:
        """Update owned blocks and pick the rows that observe or evict in this step.

        Evicted page copies are counted here, on the host, when their blocks leave
        (:func:`~vllm_kvevict.pages.own_row_blocks`): the layers count nothing."""
        layout, bs = self.layout, self.layout.block_size
        if self.ops is None:
            self.ops = page_ops_for(device)
        if self.pending_queries is None:
            self.pending_queries = default_pending_queries(self.policy, layout, device)
        observed, held_back = [], []
        for i, row in enumerate(rows):
            state = self._state_for(row)
            seq_len = row.num_computed + row.num_new
            prefilling = row.num_computed < row.num_prompt
            evicted, positions, blocks = own_row_blocks(state, row, layout, self.num_layers,
                                                        self.stats)
            num_pages = cdiv(seq_len, bs)
            if seq_len < row.num_prompt:
                continue  # mid-prompt chunk: full attention, nothing observed
            after = layout.evicted_pages(seq_len, prefilling=False)
            frees = after.stop > max(evicted.stop, after.start)
            last_query = row.first_token + row.num_new - 1
            pending_slot = None
            if prefilling:
                num_queries = min(self.observation_window, row.num_new)
            elif self.policy.latest_query_only:
                num_queries = 1 if frees else 0
            elif not self.policy.decode_statistics:
                num_queries = 0
            elif self.pending_queries == 1:
                num_queries = 1
            else:  # held back until the row evicts or holds pending_queries of them
                slot = self._slot_for(state)
                held_back.append((last_query, slot * self.pending_queries + state.num_pending))
                state.num_pending += 1
                num_queries = 0
                if frees or state.num_pending == self.pending_queries:
                    num_queries, state.num_pending = state.num_pending, 0
                    pending_slot = slot if num_queries > 1 else None
            if not (num_queries or frees):
                continue
            self._grow(state, num_pages, device)
            num_full_cols = len(positions) - (1 if seq_len % bs else 0)
            survivors = None
            if frees:
                self.stats.selections += 1
                survivors = [c for c, p in enumerate(positions[:num_full_cols]) if p not in after]
            observed.append(ObservedRow(
                row=i, state=state, first_query=last_query + 1 - num_queries,
                num_queries=num_queries, num_tokens=seq_len, num_full=seq_len // bs,
                num_full_cols=num_full_cols, blocks=blocks, survivors=survivors,
                pending_slot=pending_slot))
        batch = (StatsBatch(observed, layout, self.num_layers, device, self.pending_queries)
                 if observed else None)
        plan = StatsStepPlan(observed, batch)
        if held_back:
            query, place = zip(*held_back)
            plan.held_back = to_device({"query": torch.tensor(query, dtype=torch.int64),
                                        "place": torch.tensor(place, dtype=torch.int64)}, device)
        return plan

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
        """Observe this step's queries, then evict where the scheduler will free blocks: each for
        all rows at once, with no host sync."""
        if plan.held_back is not None:
            self._hold_back(layer, query, plan)
        batch = plan.batch
        if batch is None:
            return
        if batch.num_observing:
            self._observe(layer, query, kv_cache, batch)
        if batch.num_evicting:
            self._evict(layer, kv_cache, batch)
        if layer == self.num_layers - 1:
            batch.commit()

    def _hold_back(self, layer: int, query: torch.Tensor, plan: StatsStepPlan) -> None:
        """Store this layer's held-back decode queries (the store grows, on the host's word, to
        the slots handed out)."""
        pending = self.pending
        have = 0 if pending is None else pending.shape[1]
        if have < self._num_slots:
            grown = torch.empty((self.num_layers, max(self._num_slots, 2 * have, 8),
                                 self.pending_queries, *query.shape[1:]),
                                dtype=query.dtype, device=query.device)
            if have:
                grown[:, :have] = pending
            self.pending = pending = grown
        held_back = plan.held_back
        pending[layer].flatten(0, 1).index_copy_(0, held_back["place"],
                                                 query.index_select(0, held_back["query"]))

    def _observe(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                 batch: StatsBatch) -> None:
        """One attention-mass pass over every observing query of the step (each row's keys read
        once per group: one-query rows, window rows), then one statistics update."""
        bs = self.layout.block_size
        if self._keys is None:
            self._keys = BlockKeys.of(self.format, kv_cache)
        rows, single = batch.num_observing, batch.num_single
        logits = []  # [queries, kv, g, cols * bs] per group, scaled, in the cache's dtype
        if single:
            blocks = batch.blocks[:single, :batch.single_cols]
            queries = query[batch.single_query].unsqueeze(1)
            logits.append(self._keys.logits(kv_cache, blocks, queries, self.scale)[:, 0])
        if rows > single:
            blocks = batch.blocks[single:rows, :batch.window_cols]
            prompts = batch.num_prompt_windows
            queries = []
            if prompts:  # prompt windows: the step's queries
                queries.append(query[batch.window_query[:prompts]])
            if single + prompts < rows:  # held-back decode queries
                pending = self.pending[layer].flatten(0, 1)
                queries.append(pending[batch.window_query[prompts:]])
            queries = torch.cat(queries) if len(queries) > 1 else queries[0]
            window = self._keys.logits(kv_cache, blocks, queries, self.scale)
            logits.append(window[batch.window_rows, batch.window_slots])  # the real queries
        num_cols = max(batch.single_cols, batch.window_cols)
        if len(logits) > 1:  # padding keys: their positions lie past every query
            logits = torch.cat([nn.functional.pad(group, (0, num_cols * bs - group.shape[-1]))
                                for group in logits])
        else:
            logits = logits[0]
        self.ops.add_page_statistics(logits, batch, layer, bs)

    def _evict(self, layer: int, kv_cache: torch.Tensor, batch: StatsBatch) -> None:
        """Keep each row's sinks, window and best-scored full pages (as many as its blocks that
        stay); move the kept pages of freed blocks, in column order, over the lowest-scored pages
        not kept in blocks that stay."""
        layout = self.layout
        rows = batch.evict_rows
        held = batch.held[layer].index_select(0, rows)  # [R, C]
        full, stays = batch.full, batch.stays
        pinned = full & ((held < layout.sink_pages) | (held >= batch.window_start.unsqueeze(1)))
        stats = batch.stats[layer].index_select(0, rows).gather(
            2, held.unsqueeze(1).expand(-1, NUM_STATS, -1))
        view = PageAttentionStats.of(stats, pinned, layout.budget_pages, valid=full)
        scores = self.policy.score(view).float().masked_fill(pinned, float("inf"))
        # Rank in page order (padding first, so last once flipped): the more recent page wins.
        by_page = torch.argsort(held.masked_fill(~full, -1), dim=1, stable=True)
        kept = torch.zeros_like(full).scatter_(1, by_page, keep_mask(
            scores.gather(1, by_page), full.gather(1, by_page), pinned.gather(1, by_page),
            batch.num_keep))
        width = batch.max_moves
        if not width:
            return
        # Kept pages in freed blocks, in column order; as many pages not kept in blocks that
        # stay, lowest score first (the earlier column among equals).
        sources = kept & ~stays
        src = torch.argsort((~sources).to(torch.uint8), dim=1, stable=True)[:, :width]
        by_score = torch.argsort(scores, dim=1, stable=True)
        not_free = (~(stays & ~kept)).to(torch.uint8).gather(1, by_score)
        dst = by_score.gather(1, torch.argsort(not_free, dim=1, stable=True))[:, :width]
        valid = torch.arange(width, device=held.device) < sources.sum(1, keepdim=True)
        blocks = batch.blocks.index_select(0, rows)
        self.ops.copy_pages(kv_cache, blocks.gather(1, src), kv_cache, blocks.gather(1, dst),
                            valid)
        # Destination columns of a row are distinct: invalid pairs rewrite their own page.
        held.scatter_(1, dst, torch.where(valid, held.gather(1, src), held.gather(1, dst)))
        batch.held[layer].index_copy_(0, rows, held)
