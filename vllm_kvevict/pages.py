"""The life of a page under a selecting policy (ArkVale): fill -> backup -> evict -> recall.

Plain torch; vLLM glue (``vllm_kvevict.engine``) only feeds it the batch and the KV cache.

* **Fill.** vLLM writes a request's tokens into the blocks the scheduler gave it; logical page
  ``p`` is written into the block at position ``p`` of the request's block table.
* **Backup.** In the step a page fills, each layer copies it to a host page and stores its digest
  (``[hi, lo]`` per KV head, kept on the device for every page, resident or not).
* **Evict.** The scheduler frees the blocks of positions ``PageLayout.evicted_pages``; whatever a
  freed block held in each layer is no longer resident (its host copy stays).
* **Recall.** Each decode step, per layer, the policy scores every backed-up page with the query;
  sinks + window + the top-k pages are kept. Kept pages that are not resident are copied from
  host into the owned blocks holding the lowest-scored pages that were not kept.

Because layers choose different pages, one block holds different logical pages in different
layers: :class:`RequestPages` keeps, per layer, which page each owned block holds. Keys carry their
original RoPE positions, so attention over any set of blocks is attention over the pages they
hold, in any order, as long as the page being filled comes last.

Invariants (per request, per layer):

* between steps (after the scheduler's frees), every owned block at a full position holds a
  distinct backed-up page; the block of the page being filled holds that page;
* sink pages and window pages are always held at their own positions;
* with nothing evicted, every block holds its own page and nothing is selected or recalled, so
  the result is the stock computation.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from vllm_kvevict.algorithms.digest import page_digests
from vllm_kvevict.algorithms.selection import keep_mask
from vllm_kvevict.paging import PageLayout, cdiv


class HostStoreFull(RuntimeError):
    """The host store has no free page (the scheduler's reservation should prevent this)."""


class BlockFormat:
    """How one layer's KV-cache tensor stores a block (a page).

    vLLM 0.32 gives every layer a view ``[num_blocks, kv_heads, block_size, 2 * head_dim]``
    (strided in the engine's resolved ``KVCacheLayout``): blocks are the first dimension, and
    what differs between backends is where a block keeps its keys (:meth:`keys`).
    """

    def page_shape(self, kv_cache: torch.Tensor) -> tuple[int, ...]:
        return tuple(kv_cache.shape[1:])

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """``[n, *page_shape]`` contiguous copies of the blocks."""
        return kv_cache.index_select(0, block_ids)

    def write(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, pages: torch.Tensor) -> None:
        kv_cache.index_copy_(0, block_ids, pages.to(kv_cache.device, non_blocking=True))

    def keys(self, pages: torch.Tensor) -> torch.Tensor:
        """``[n, block_size, num_kv_heads, head_dim]`` keys of ``read`` pages."""
        raise NotImplementedError


class CPUBlockFormat(BlockFormat):
    """vLLM's CPU layout (``LBHNC``); per head, the first ``block_size * head_dim`` elements
    hold the keys, the rest the values.

    The CPU kernels store a block's keys in an ISA-specific order (e.g. transposed,
    ``[head_dim, block_size]``, for AVX-512). ``key_index[t * head_dim + d]`` is the element
    holding key ``(t, d)``; ``None`` means row-major ``[block_size, head_dim]``.
    """

    def __init__(self, key_index: torch.Tensor | None = None):
        self.key_index = key_index
        self._tiles: dict[tuple[int, int], tuple[int, int] | None] = {}

    def keys(self, pages):
        n, kv_heads, block_size, two_d = pages.shape
        head_dim = two_d // 2
        raw = pages.reshape(n, kv_heads, 2 * block_size * head_dim)[:, :, :block_size * head_dim]
        if self.key_index is not None:
            tiles = self._tiles.get((block_size, head_dim), False)
            if tiles is False:
                tiles = self._tiles[block_size, head_dim] = key_tiles(self.key_index, block_size,
                                                                      head_dim)
            if tiles is None:
                raw = raw.index_select(2, self.key_index.to(raw.device))
            else:  # a tiled layout: views and one copy instead of a gather
                tile_t, tile_d = tiles
                raw = raw.reshape(n, kv_heads, block_size // tile_t, head_dim // tile_d, tile_t,
                                  tile_d).transpose(3, 4)
        return raw.reshape(n, kv_heads, block_size, head_dim).permute(0, 2, 1, 3)


def key_tiles(key_index: torch.Tensor, block_size: int, head_dim: int) -> tuple[int, int] | None:
    """``(tile_t, tile_d)`` if ``key_index`` is the layout ``[block_size / tile_t,
    head_dim / tile_d, tile_t, tile_d]`` (row-major is ``(1, head_dim)``, transposed
    ``(block_size, 1)``; the CPU kernels' VNNI packing for AMX is ``(16, 2)``), else None."""
    t = torch.arange(block_size).unsqueeze(1)
    d = torch.arange(head_dim).unsqueeze(0)
    for tile_t in (n for n in range(1, block_size + 1) if block_size % n == 0):
        for tile_d in (n for n in range(1, head_dim + 1) if head_dim % n == 0):
            element = (((t // tile_t) * (head_dim // tile_d) + d // tile_d) * (tile_t * tile_d)
                       + (t % tile_t) * tile_d + d % tile_d)
            if torch.equal(element.flatten(), key_index.cpu()):
                return tile_t, tile_d
    return None


class FlashBlockFormat(BlockFormat):
    """FlashAttention's reading of the layer view: a token's key, then its value, in the last
    dimension; the backend splits it as ``kv_cache.transpose(1, 2).split(head_dim, dim=-1)``.
    The physical order is the engine's ``KVCacheLayout`` (``LBNHC``, tokens outside heads, by
    default); pages read here are contiguous whatever the strides.
    """

    def keys(self, pages):
        head_dim = pages.shape[-1] // 2
        return pages[..., :head_dim].transpose(1, 2)


@dataclasses.dataclass
class PageStats:
    """Cumulative counters. Pages backed up count each page once (all layers); evictions and
    recalls count page copies of one layer."""

    backed_up: int = 0
    evicted: int = 0
    recalled: int = 0
    selections: int = 0  # (request, step) pairs that selected pages


@dataclasses.dataclass
class SelectionProbe:
    """Diagnostics (benchmarks only): how well digest scores find the pages that exact attention
    weighs most. For each selection, exact attention of the query over all backed-up pages (keys
    read from the host store) gives each page's attention mass (mean over query heads); among
    pages that are not pinned (sinks, window), the ``top_k`` by mass are compared with the
    ``top_k`` by digest score."""

    selections: int = 0
    top_k_overlap: float = 0.0  # sum over selections of |digest top-k & exact top-k| / k
    top1_hits: int = 0  # the heaviest unpinned page was among the digest top-k

    def record(self, query: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor,
               sink_pages: int, window_pages: int, top_k: int) -> None:
        """``query [heads, d]``, ``keys [pages, page, kv_heads, d]``, ``scores [pages]``."""
        num_pages, page, kv_heads, head_dim = keys.shape
        unpinned = torch.arange(sink_pages, num_pages - window_pages)
        k = min(top_k, unpinned.numel())
        if k <= 0:
            return
        group = query.shape[0] // kv_heads
        q = query.float().view(kv_heads, group, head_dim)
        flat = keys.float().permute(2, 0, 1, 3).reshape(kv_heads, num_pages * page, head_dim)
        logits = torch.einsum("hgd,htd->hgt", q, flat) / head_dim ** 0.5
        mass = logits.softmax(-1).view(kv_heads, group, num_pages, page).sum(-1).mean((0, 1))
        exact = set(unpinned[mass[unpinned].topk(k).indices].tolist())
        digest = set(unpinned[scores[unpinned].topk(k).indices].tolist())
        self.selections += 1
        self.top_k_overlap += len(exact & digest) / k
        self.top1_hits += int(unpinned[mass[unpinned].argmax()].item() in digest)


class HostPageStore:
    """Host copies of pages (all layers) and their device-side digests, by host page id.

    One host page id names a logical page of one request in every layer. Ids are handed out
    before the tensors exist (the scheduler plans a step before any layer runs); :meth:`bind`
    allocates them from the first layer's KV cache. On CUDA the host tensors are pinned, so
    copies to and from them are asynchronous.
    """

    def __init__(self, num_pages: int, num_layers: int):
        self.num_pages = num_pages
        self.num_layers = num_layers
        self.pages: list[torch.Tensor] = []
        self.digests: list[torch.Tensor] = []
        self.page_bytes = 0
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def bound(self) -> bool:
        return bool(self.digests)

    def bind(self, kv_cache: torch.Tensor, block_format: "BlockFormat", num_kv_heads: int,
             head_dim: int) -> None:
        """Allocate the host pages and digests (idempotent).

        A store of 0 pages keeps no copies: its digests are indexed by KV-cache block instead
        (policies that keep every page resident).
        """
        if self.bound:
            return
        device = kv_cache.device
        shape = block_format.page_shape(kv_cache)
        # Pinned (CUDA) host memory is page-locked, so committed, as soon as it is allocated;
        # unpinned memory (CPU) stays uncommitted until a page is first written.
        pin = device.type == "cuda"
        self.pages = [torch.empty((self.num_pages, *shape), dtype=kv_cache.dtype, pin_memory=pin)
                      for _ in range(self.num_layers)] if self.num_pages else []
        slots = self.num_pages or kv_cache.shape[0]
        self.digests = [torch.empty((slots, 2, num_kv_heads, head_dim),
                                    dtype=torch.float32, device=device)
                        for _ in range(self.num_layers)]
        page_numel = 1
        for n in shape:
            page_numel *= n
        self.page_bytes = self.num_layers * page_numel * kv_cache.element_size()

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise HostStoreFull(f"vllm-kvevict: host page store full ({self.num_pages} pages)")
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def release(self, host_ids: Sequence[int]) -> None:
        self._free.extend(host_ids)


@dataclasses.dataclass
class RequestPages:
    """One request's pages on this worker.

    ``positions``/``block_ids`` list the blocks the request owns now (ascending positions);
    ``held[layer, i]`` is the logical page block ``block_ids[i]`` holds in that layer.
    """

    host_ids: list[int] = dataclasses.field(default_factory=list)  # by logical page
    positions: list[int] = dataclasses.field(default_factory=list)
    block_ids: list[int] = dataclasses.field(default_factory=list)
    held: torch.Tensor | None = None
    num_tokens: int = 0  # tokens written after the last planned step
    # Attention-statistics policies: [layers, NUM_STATS, pages] by logical page.
    attention: torch.Tensor | None = None

    def own(self, positions: list[int], block_ids: list[int], num_layers: int) -> int:
        """Owned blocks become ``positions``/``block_ids``; returns page copies dropped.

        A block seen before at the same position keeps what it holds in every layer; a new one
        holds its own page (vLLM writes page ``p`` into position ``p``).
        """
        n = len(self.positions)
        if (self.held is not None and positions[:n] == self.positions
                and block_ids[:n] == self.block_ids):  # usual step: same blocks, maybe appended
            if len(positions) > n:
                appended = torch.tensor(positions[n:], dtype=torch.int64)
                self.held = torch.cat([self.held, appended.expand(num_layers, -1)], dim=1)
                self.positions, self.block_ids = list(positions), list(block_ids)
            return 0
        before = {(p, b): i for i, (p, b) in enumerate(zip(self.positions, self.block_ids))}
        cols = [before.get(key, -1) for key in zip(positions, block_ids)]
        new_held = torch.tensor(positions, dtype=torch.int64).unsqueeze(0).repeat(num_layers, 1)
        kept = [(i, c) for i, c in enumerate(cols) if c >= 0]
        if kept and self.held is not None:
            dst, src = zip(*kept)
            new_held[:, list(dst)] = self.held[:, list(src)]
        dropped = len(self.positions) - len(kept)
        self.positions, self.block_ids, self.held = list(positions), list(block_ids), new_held
        return dropped * num_layers


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


@dataclasses.dataclass
class RowSelection:
    """A row that selects pages in this step (what :class:`SelectionBatch` stacks)."""

    row: int
    token: int  # the query token that scores pages
    state: RequestPages
    num_full: int  # backed-up pages
    num_full_cols: int  # owned blocks holding full pages (the page being filled excluded)
    num_keep: int  # pages kept: sinks + full window + top-k
    pinned: tuple[int, int]  # pages [0, a) and [b, num_full) are always kept
    partial_block: int  # the block of the page being filled, -1 if none
    candidates: list[int]  # full columns that may receive a kept page


class SelectionBatch:
    """The step's selecting rows as padded tensors, built once per step, read by every layer.

    ``R`` rows; ``P`` the most full pages of a row and ``C`` the most full columns (owned
    blocks holding full pages). Page ``P`` stands for "no page": ``held`` holds it in the
    padding columns, and padding pages are not ``valid``. ``held[layer]`` is updated by the
    layers' moves and written back to the requests' page tables after the last layer
    (:meth:`commit`).
    """

    def __init__(self, selections: list[RowSelection], num_layers: int, device) -> None:
        rows = len(selections)
        num_pages = max(sel.num_full for sel in selections)
        num_cols = max(sel.num_full_cols for sel in selections)
        self.states = [sel.state for sel in selections]
        self.num_cols = [sel.num_full_cols for sel in selections]
        self.rows = torch.tensor([sel.row for sel in selections], device=device)
        self.tokens = torch.tensor([sel.token for sel in selections], device=device)
        self.num_keep = torch.tensor([sel.num_keep for sel in selections], device=device)
        self.partial_blocks = torch.tensor([sel.partial_block for sel in selections],
                                           device=device)
        self.host_ids = torch.zeros((rows, num_pages), dtype=torch.int64)
        self.valid = torch.zeros((rows, num_pages), dtype=torch.bool)
        self.pinned = torch.zeros((rows, num_pages), dtype=torch.bool)
        self.blocks = torch.zeros((rows, num_cols), dtype=torch.int64)
        self.candidates = torch.zeros((rows, num_cols), dtype=torch.bool)
        self.held = torch.full((num_layers, rows, num_cols), num_pages, dtype=torch.int64)
        for i, sel in enumerate(selections):
            n, cols = sel.num_full, sel.num_full_cols
            self.host_ids[i, :n] = torch.tensor(sel.state.host_ids[:n])
            self.valid[i, :n] = True
            self.pinned[i, :sel.pinned[0]] = True
            self.pinned[i, sel.pinned[1]:n] = True
            self.blocks[i, :cols] = torch.tensor(sel.state.block_ids[:cols])
            self.candidates[i, sel.candidates] = True
            self.held[:, i, :cols] = sel.state.held[:, :cols]
        for name in ("host_ids", "valid", "pinned", "blocks", "candidates", "held"):
            setattr(self, name, getattr(self, name).to(device))

    def __len__(self) -> int:
        return len(self.states)

    def commit(self) -> None:
        """Write the pages each column holds back to the requests' page tables."""
        held = self.held.cpu()
        for i, (state, cols) in enumerate(zip(self.states, self.num_cols)):
            state.held[:, :cols] = held[:, i, :cols]


@dataclasses.dataclass
class StepPlan:
    """What every layer does in one step (built once per step, read by every layer)."""

    backup_blocks: torch.Tensor  # [n] blocks of pages filled this step
    backup_hosts: torch.Tensor  # [n] their host pages
    selections: SelectionBatch | None  # decode rows with evicted pages: select + recall
    prefill_ends: SelectionBatch | None  # rows finishing their prompt: keep the best pages
    sparse_seq_lens: dict[int, int]  # row -> tokens attended under sparse attention

    @property
    def empty(self) -> bool:
        return not (self.backup_blocks.numel() or self.selections or self.prefill_ends)


class RequestRegistry:
    """The page state of each request a worker runs.

    A request seen again with fewer computed tokens than its state records was preempted and is
    recomputed from scratch: its state (and host pages) are dropped and it starts over.
    Subclasses provide ``requests``, ``store`` and ``recalls`` (host pages held only if true).
    """

    requests: dict[str, RequestPages]
    store: HostPageStore
    recalls: bool

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
            state = self.requests[row.req_id] = RequestPages()
        return state


class PageRuntime(RequestRegistry):
    """Per-worker page bookkeeping of one KV-cache group under a selecting policy."""

    def __init__(self, layout: PageLayout, policy, digest: str, sparse_attention: bool,
                 store: HostPageStore, block_format: BlockFormat, num_layers: int):
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
        self.requests: dict[str, RequestPages] = {}
        self.stats = PageStats()
        self.probe: SelectionProbe | None = None  # set by benchmarks

    @property
    def bound(self) -> bool:
        return self.store.bound

    def bind(self, kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int, scale: float) -> None:
        """Allocate the host store and digests once the KV cache exists."""
        self.store.bind(kv_cache, self.format, num_kv_heads, head_dim)

    # --- per step ------------------------------------------------------------------------------

    def plan_step(self, rows: Sequence[RowInput], device) -> StepPlan:
        """Update owned blocks, reserve host pages for pages filled this step, pick the rows that
        select. Called once per step before any layer runs."""
        layout, bs = self.layout, self.layout.block_size
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
                                                   self.stats)
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
                self.stats.backed_up += len(new_pages)

            partial = seq_len % bs != 0
            last_token = row.first_token + row.num_new - 1
            restricts = (not self.recalls
                         and num_full > layout.selected_pages(num_full, partial))
            if not prefilling and (len(evicted) or restricts):
                selections.append(self._selection(i, last_token, state, num_full, partial))
                self.stats.selections += 1
                if self.sparse_attention:
                    num_selected = layout.selected_pages(num_full, partial)
                    sparse[i] = num_selected * bs + seq_len % bs
            elif prefilling and seq_len >= row.num_prompt:
                after = layout.evicted_pages(seq_len, prefilling=False)
                if len(after):
                    sel = self._selection(i, last_token, state, num_full, partial)
                    # Only blocks that stay owned receive kept pages.
                    sel.candidates = [c for c in sel.candidates if positions[c] not in after]
                    prefill_ends.append(sel)
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.int64, device=device)  # noqa: E731
        batch = lambda rows: (  # noqa: E731
            SelectionBatch(rows, self.num_layers, device) if rows else None)
        return StepPlan(as_tensor(backup_blocks), as_tensor(backup_hosts), batch(selections),
                        batch(prefill_ends), sparse)

    def _selection(self, row: int, token: int, state: RequestPages, num_full: int,
                   partial: bool) -> RowSelection:
        layout = self.layout
        num_full_cols = len(state.positions) - (1 if partial else 0)
        window_full = layout.window_pages - (1 if partial else 0)
        return RowSelection(
            row=row, token=token, state=state, num_full=num_full, num_full_cols=num_full_cols,
            num_keep=min(num_full, layout.sink_pages + window_full + layout.top_k_pages),
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
            self._backup(layer, kv_cache, plan.backup_blocks, plan.backup_hosts)
        batch = plan.selections
        if batch is None:
            return None
        keep, scores = self._keep(layer, query, batch)
        moved = self._place_kept(layer, kv_cache, batch, keep, scores, from_host=True)
        self.stats.recalled += moved
        if layer == self.num_layers - 1:
            batch.commit()
        if not self.sparse_attention:
            return None
        return batch.rows, _attended_blocks(batch, keep, batch.held[layer])

    def after_attention(self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
                        plan: StepPlan) -> None:
        """Rows that finished their prompt: move the best pages (scored with the last prompt
        query) into the blocks that stay owned, before the scheduler frees the others."""
        batch = plan.prefill_ends
        if batch is None:
            return
        keep, scores = self._keep(layer, query, batch)
        self._place_kept(layer, kv_cache, batch, keep, scores, from_host=False)
        if layer == self.num_layers - 1:
            batch.commit()

    def _backup(self, layer: int, kv_cache: torch.Tensor, blocks: torch.Tensor,
                hosts: torch.Tensor) -> None:
        pages = self.format.read(kv_cache, blocks)
        hi, lo = page_digests(self.format.keys(pages), self.digest)
        self.store.digests[layer][hosts] = torch.stack([hi, lo], dim=1)
        if not self.store.pages:
            return
        host_pages = self.store.pages[layer]
        host_pages.index_copy_(0, hosts.to(host_pages.device), pages.to(host_pages.device))

    def _keep(self, layer: int, query: torch.Tensor, batch: SelectionBatch):
        """``[R, P]`` pages each row keeps in ``layer`` and the scores of all its pages."""
        box = self.store.digests[layer][batch.host_ids]  # [R, P, 2, kv_heads, head_dim]
        scores = self.policy.score(query[batch.tokens], box[:, :, 0], box[:, :, 1])
        keep = keep_mask(scores, batch.valid, batch.pinned, batch.num_keep)
        if self.probe is not None:
            self._probe(layer, query, batch, scores)
        return keep, scores

    def _place_kept(self, layer: int, kv_cache: torch.Tensor, batch: SelectionBatch,
                    keep: torch.Tensor, scores: torch.Tensor, from_host: bool) -> int:
        """Make every kept page resident in a candidate column of its row: kept pages that no
        candidate holds go, in ascending page order, over the candidates holding the
        lowest-scored pages not kept. Their content comes from the host store, or, at a
        prompt's end (``from_host=False``), from the page's own block (then page ``p`` is held
        by column ``p``: nothing was evicted yet). Returns the page copies made."""
        held = batch.held[layer]  # [R, C]
        rows, num_pages = keep.shape
        candidates = batch.candidates
        keep_padded = torch.nn.functional.pad(keep, (0, 1))  # page P: no page
        in_place = torch.zeros_like(keep_padded).scatter_(
            1, torch.where(candidates, held, num_pages), True)[:, :num_pages]
        missing = keep & ~in_place
        if not missing.any():  # most steps and layers (on CUDA: one sync per layer)
            return 0
        held_kept = keep_padded.gather(1, held) & candidates
        victims = candidates & ~held_kept
        victim_scores = torch.nn.functional.pad(scores.float(), (0, 1)).gather(1, held)
        victim_scores = victim_scores.masked_fill(~victims, float("inf"))
        width = min(num_pages, held.shape[1])
        victim_cols = torch.argsort(victim_scores, dim=1, stable=True)[:, :width]
        missing_pages = torch.argsort((~missing).to(torch.uint8), dim=1, stable=True)[:, :width]
        pairs = torch.arange(width, device=keep.device) < missing.sum(1, keepdim=True)
        row_ids = torch.arange(rows, device=keep.device)[:, None].expand(rows, width)[pairs]
        pages, cols = missing_pages[pairs], victim_cols[pairs]
        blocks = batch.blocks[row_ids, cols]
        if from_host:
            host_pages = self.store.pages[layer]
            # On CUDA this copy of the ids waits for the stream: every backup has landed.
            hosts = batch.host_ids[row_ids, pages].to(host_pages.device)
            self.format.write(kv_cache, blocks, host_pages.index_select(0, hosts))
        else:
            source = batch.blocks[row_ids, pages]
            self.format.write(kv_cache, blocks, self.format.read(kv_cache, source))
        held[row_ids, cols] = pages
        self.stats.evicted += pages.numel()
        return pages.numel()

    def _probe(self, layer: int, query: torch.Tensor, batch: SelectionBatch,
               scores: torch.Tensor) -> None:
        """Benchmarks only: compare each row's digest ranking with exact attention."""
        layout = self.layout
        for i in range(len(batch)):
            n = int(batch.valid[i].sum())
            window_full = int(batch.pinned[i, layout.sink_pages:n].sum())
            pages = self.store.pages[layer][batch.host_ids[i, :n].cpu()]
            self.probe.record(query[batch.tokens[i]].cpu(), self.format.keys(pages).cpu(),
                              scores[i, :n].cpu(), layout.sink_pages, window_full,
                              layout.top_k_pages)


def _attended_blocks(batch: SelectionBatch, keep: torch.Tensor,
                     held: torch.Tensor) -> torch.Tensor:
    """``[R, C + 1]``: each row's blocks holding kept pages, in column order, then the block of
    the page being filled (at index ``num_keep``)."""
    kept = torch.nn.functional.pad(keep, (0, 1)).gather(1, held)
    order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)
    table = torch.nn.functional.pad(batch.blocks.gather(1, order), (0, 1))
    at = batch.num_keep[:, None]
    partial = batch.partial_blocks[:, None]
    table.scatter_(1, at, torch.where(partial >= 0, partial, table.gather(1, at)))
    return table
