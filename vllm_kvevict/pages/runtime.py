"""The page runtime of a selecting policy (arkvale, quest): plan per step, run per layer."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from vllm_kvevict.algorithms.attention_stats import page_mass_from_logits
from vllm_kvevict.pages.formats import BlockFormat
from vllm_kvevict.pages.keys import BlockKeys
from vllm_kvevict.pages.ops import PageOps, page_ops_for
from vllm_kvevict.pages.plan import RowSelection, SelectionBatch, StepPlan, pin_pages, to_device
from vllm_kvevict.pages.probe import SelectionProbe
from vllm_kvevict.pages.requests import (PageStats, RequestPages, RequestRegistry, RowInput,
                                         own_row_blocks)
from vllm_kvevict.pages.store import HostPageStore
from vllm_kvevict.paging import PageLayout


class PageRuntime(RequestRegistry):
    """Per-worker page bookkeeping of one KV-cache group under a selecting policy."""

    def __init__(self, layout: PageLayout, policy, digest: str, sparse_attention: bool,
                 store: HostPageStore, block_format: BlockFormat, num_layers: int,
                 ops: PageOps | None = None, observation_window: int = 0,
                 per_head: bool = False):
        self.layout = layout
        self.policy = policy
        self.digest = digest
        self.sparse_attention = sparse_attention
        self.store = store
        self.format = block_format
        self.num_layers = num_layers
        # Non-recalling policies (quest) keep every page resident: no host copies, digests by
        # block id, attention restricted to the selection.
        self.recalls = policy.recalls
        if not self.recalls:
            self.sparse_attention = True
        # Anchors: the budget left besides sinks, window and top-k, per layer, holds the pages
        # the prompt's last ``observation_window`` queries attend to most (chosen when it ends).
        self.observation_window = observation_window
        self.anchor_pages = 0
        if policy.keeps_anchors(sparse_attention, observation_window):
            self.anchor_pages = (layout.budget_pages - layout.sink_pages - layout.window_pages
                                 - layout.top_k_pages)
        # One placement per KV head: each head's slice of a block holds the page that head
        # selects (``page_heads`` is set to the KV heads by bind); otherwise one per block.
        self.per_head = per_head and self.recalls and not self.sparse_attention
        self.page_heads = 1
        self.scale = 1.0  # the layers' softmax scale, set by bind
        self._keys: BlockKeys | None = None
        self.requests: dict[str, RequestPages] = {}
        self.ops = ops  # chosen by the KV cache's device at the first plan unless given
        self.probe: SelectionProbe | None = None  # set by benchmarks
        self._stats = PageStats()
        # Page copies counted on the device by the layers ([recalled, evicted], cumulative),
        # added to ``stats`` when it is read: counting on the host would cost a sync per layer.
        self._copies: torch.Tensor | None = None

    @property
    def stats(self) -> PageStats:
        """Cumulative counters (reading them waits for the layers' copies to be counted)."""
        if self._copies is None:
            return dataclasses.replace(self._stats)
        recalled, evicted = self._copies.tolist()
        return dataclasses.replace(self._stats, recalled=self._stats.recalled + recalled,
                                   evicted=self._stats.evicted + evicted)

    @property
    def selections(self) -> int:
        """(request, step) pairs that selected pages so far (host-side: no device read)."""
        return self._stats.selections

    @property
    def bound(self) -> bool:
        return self.store.bound

    def bind(self, kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int, scale: float) -> None:
        """Allocate the host store and digests once the KV cache exists."""
        self.store.bind(kv_cache, self.format, num_kv_heads, head_dim)
        self.scale = scale
        if self.per_head:
            self.page_heads = num_kv_heads

    # --- per step ------------------------------------------------------------------------------

    def plan_step(self, rows: Sequence[RowInput], device) -> StepPlan:
        """Update owned blocks, reserve host pages for pages filled this step, pick the rows that
        select. Called once per step before any layer runs."""
        layout, bs = self.layout, self.layout.block_size
        if self.ops is None:
            self.ops = page_ops_for(device)
        if self._copies is None:
            self._copies = torch.zeros(2, dtype=torch.int64, device=device)
        backup_blocks: list[int] = []
        backup_hosts: list[int] = []
        selections: list[RowSelection] = []
        prefill_ends: list[RowSelection] = []
        sparse: dict[int, int] = {}
        for i, row in enumerate(rows):
            state = self._state_for(row)
            seq_len = row.num_computed + row.num_new
            prefilling = row.num_computed < row.num_prompt
            evicted, positions, _ = own_row_blocks(state, row, layout, self.num_layers,
                                                   self._stats)
            num_full = seq_len // bs
            new_pages = range(len(state.host_ids), num_full)
            if len(new_pages):
                if self.recalls:
                    hosts = self.store.allocate(len(new_pages))
                else:
                    hosts = [int(row.block_row[p]) for p in new_pages]
                state.host_ids.extend(hosts)
                backup_hosts.extend(hosts)
                backup_blocks.extend(int(row.block_row[p]) for p in new_pages)
                self._stats.backed_up += len(new_pages)

            partial = seq_len % bs != 0
            last_token = row.first_token + row.num_new - 1
            restricts = (not self.recalls
                         and num_full > layout.selected_pages(num_full, partial))
            if not prefilling and (len(evicted) or restricts):
                selections.append(self._selection(i, last_token, state, num_full, partial))
                self._stats.selections += 1
                if self.sparse_attention:  # no anchors: sinks + top-k + window
                    num_selected = layout.selected_pages(num_full, partial)
                    sparse[i] = num_selected * bs + seq_len % bs
            elif prefilling and seq_len >= row.num_prompt:
                after = layout.evicted_pages(seq_len, prefilling=False)
                if len(after):
                    sel = self._selection(i, last_token, state, num_full, partial)
                    # Only blocks that stay owned receive kept pages.
                    sel.candidates = [c for c in sel.candidates if positions[c] not in after]
                    sel.last_position = seq_len - 1
                    sel.num_observed = min(self.observation_window, row.num_new)
                    prefill_ends.append(sel)
        backup = to_device({"blocks": torch.tensor(backup_blocks, dtype=torch.int64),
                            "hosts": torch.tensor(backup_hosts, dtype=torch.int64)}, device)
        batch = lambda rows: (  # noqa: E731
            SelectionBatch(rows, self.num_layers, device, self.anchor_pages, self.page_heads)
            if rows else None)
        return StepPlan(backup["blocks"], backup["hosts"], batch(selections),
                        batch(prefill_ends), sparse)

    def _selection(self, row: int, token: int, state: RequestPages, num_full: int,
                   partial: bool) -> RowSelection:
        layout = self.layout
        num_full_cols = len(state.positions) - (1 if partial else 0)
        window_full = layout.window_pages - (1 if partial else 0)
        return RowSelection(
            row=row, token=token, state=state, num_full=num_full, num_full_cols=num_full_cols,
            num_keep=min(num_full, layout.sink_pages + window_full + self.anchor_pages
                         + layout.top_k_pages),
            pinned=(layout.sink_pages, max(0, num_full - window_full)),
            partial_block=state.block_ids[-1] if partial else -1,
            candidates=list(range(num_full_cols)))

    # --- per layer -----------------------------------------------------------------------------

    def before_attention(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                         plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Back up this step's full pages, then select and recall for all decode rows at once.

        Returns, under sparse attention, ``(rows, table)``: each selecting row's blocks to
        attend over (kept pages in column order, then the page being filled; the rest of the
        table row is unspecified); otherwise None (rows attend over all owned blocks).
        """
        if plan.backup_blocks.numel():
            self.ops.backup(kv_cache, self.format, plan.backup_blocks, plan.backup_hosts,
                            self.store.digests[layer],
                            self.store.pages[layer] if self.store.pages else None, self.digest)
        batch = plan.selections
        if batch is None:
            return None
        keep = self._select(layer, query, kv_cache, batch, from_host=True)
        if layer == self.num_layers - 1:
            batch.commit()
        if not self.sparse_attention:
            return None
        return batch.rows, self.ops.attended_blocks(batch, keep, batch.held[layer])

    def after_attention(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                        plan: StepPlan) -> None:
        """Rows that finished their prompt: choose their anchors (the pages the last prompt
        queries attend to most), then move them and the best pages (scored with the last prompt
        query) into the blocks that stay owned, before the scheduler frees the others."""
        batch = plan.prefill_ends
        if batch is None:
            return
        if self.anchor_pages:
            self._choose_anchors(layer, query, kv_cache, batch)
        self._select(layer, query, kv_cache, batch, from_host=False)
        if layer == self.num_layers - 1:
            batch.commit(anchors_chosen=self.anchor_pages > 0)

    def _choose_anchors(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                        batch: SelectionBatch) -> None:
        """Exact attention of each row's last ``num_observed`` prompt queries over its full
        pages (each page still in its own block), summed over those queries (and over KV heads,
        unless each head has its own placement); a page's anchor score is its mass plus the
        mass of the page before it, so that text cut by a page boundary (a number) is anchored
        whole. The ``A`` unpinned pages scoring highest become the layer's anchors and are
        pinned."""
        if self._keys is None:
            self._keys = BlockKeys.of(self.format, kv_cache)
        bs, window = self.layout.block_size, self.observation_window
        back = torch.arange(window - 1, -1, -1, device=batch.tokens.device)  # [W]
        observed = back < batch.num_observed[:, None]  # [R, W]
        tokens = torch.where(observed, batch.tokens[:, None] - back, batch.tokens[:, None])
        num_pages = batch.valid.shape[1]
        heads = batch.heads
        valid = batch.valid[::heads]  # per request
        blocks = batch.blocks[::heads, :num_pages]  # page p in column p: nothing evicted yet
        logits = self._keys.logits(kv_cache, blocks, query[tokens], self.scale)
        offsets = torch.arange(bs, device=blocks.device)
        pages = torch.arange(num_pages, device=blocks.device)
        key_positions = torch.where(valid[:, :, None], pages[:, None] * bs + offsets,
                                    torch.iinfo(torch.int64).max)  # padding: never seen
        mass = page_mass_from_logits(logits, key_positions, batch.last_positions[:, None] - back,
                                     per_kv_head=heads > 1)  # [R, W, (kv,) P]
        if heads > 1:
            mass = (mass * observed[..., None, None]).sum(1).flatten(0, 1)  # [R * kv, P]
        else:
            mass = (mass * observed[..., None]).sum(1)  # [R, P]
        mass = mass + torch.nn.functional.pad(mass[:, :-1], (1, 0))  # + the page before
        pinned = batch.pinned[layer]
        ranked = mass.masked_fill(pinned | ~batch.valid, float("-inf"))
        count = min(self.anchor_pages, num_pages)
        values, best = ranked.topk(count, dim=1)
        anchors = torch.where(values > float("-inf"), best, -1)
        batch.anchors[layer, :, :count] = anchors
        pin_pages(pinned, anchors)

    def _select(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                batch: SelectionBatch, from_host: bool) -> torch.Tensor:
        """Score, keep and (recalling policies) place kept pages for every row of ``batch``;
        returns the ``[R, P]`` keep mask. Page copies are counted where the ops count them
        (a device tensor, or a host number on CPU)."""
        source = None
        if self.recalls:  # otherwise every page is resident in its own block
            source = self.store.pages[layer] if from_host else kv_cache
        keep, scores, moved = self.ops.select(self.policy, query, self.store.digests[layer],
                                              batch, layer, kv_cache, source, from_host)
        if source is not None:
            if isinstance(moved, int):  # counted on the host (CPU)
                self._stats.evicted += moved
                self._stats.recalled += moved if from_host else 0
            else:
                self._copies[1] += moved
                if from_host:
                    self._copies[0] += moved
        if self.probe is not None:
            self._probe(layer, query, batch, scores)
        return keep

    def _probe(self, layer: int, query: torch.Tensor, batch: SelectionBatch,
               scores: torch.Tensor) -> None:
        """Benchmarks only: compare each selection row's digest ranking with exact attention
        (of its KV head's query heads over that head's keys, with one placement per head)."""
        queries = batch.queries(query)
        for i in range(queries.shape[0]):
            n = int(batch.valid[i].sum())
            pages = self.store.pages[layer][batch.host_ids[i, :n].cpu()]
            keys = self.format.keys(pages)  # [n, block_size, kv_heads, head_dim]
            if batch.heads > 1:
                head = i % batch.heads
                keys = keys[:, :, head:head + 1]
            self.probe.record(queries[i].cpu(), keys.cpu(), scores[i, :n].cpu(),
                              batch.pinned[layer, i, :n].cpu(), self.layout.top_k_pages)
