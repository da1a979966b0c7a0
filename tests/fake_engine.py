"""A fake engine for the page runtimes: a scheduler's block table, a KV cache in vLLM's CPU or
FlashAttention layout (CPU tensors with the CUDA layout's strides), and the runtime under test.

A small fake scheduler hands out blocks and frees ``PageLayout.evicted_pages`` as the real manager
does; every token's value vector carries ``page + 100 * layer``, so a block's content names the
page it holds and the per-layer page tables can be checked against the cache itself. The
``cache`` fixture (tests/conftest.py) runs a test on each layout of :data:`CACHES`.
"""
import torch

from tests.flash_layout import flash_layer_caches, read_value, write_tokens
from vllm_kvevict.pages import (CPUBlockFormat, FlashBlockFormat, HostPageStore, PageRuntime,
                                RowInput)
from vllm_kvevict.paging import PageLayout, cdiv
from vllm_kvevict.policies import get_policy


BS, KV_HEADS, HEAD_DIM, LAYERS, NUM_BLOCKS = 4, 2, 8, 2, 64
GROUP = 2  # query heads per KV head
LAYOUT = PageLayout(block_size=BS, budget_pages=6, sink_pages=1, window_pages=1, top_k_pages=2)


class CPUCache:
    """vLLM's CPU cache: per block and head, the block's keys then its values (row-major)."""

    fmt = CPUBlockFormat()

    def caches(self):
        return [torch.zeros(NUM_BLOCKS, KV_HEADS, BS, 2 * HEAD_DIM) for _ in range(LAYERS)]

    def write(self, kv, slots, keys, values):
        for slot, key, value in zip(slots.tolist(), keys, values):
            block, offset = divmod(slot, BS)
            raw = kv[block].view(KV_HEADS, 2, BS, HEAD_DIM)
            raw[:, 0, offset], raw[:, 1, offset] = key, value

    def value(self, kv, block, offset):
        return kv[block].view(KV_HEADS, 2, BS, HEAD_DIM)[:, 1, offset]


class FlashCache:
    """vLLM 0.32's FlashAttention cache in one of its physical layouts."""

    fmt = FlashBlockFormat()

    def __init__(self, layout):
        self.layout = layout

    def caches(self):
        return flash_layer_caches(LAYERS, NUM_BLOCKS, BS, KV_HEADS, HEAD_DIM, layout=self.layout)

    def write(self, kv, slots, keys, values):
        write_tokens(kv, slots, keys, values)

    def value(self, kv, block, offset):
        return read_value(kv, block, offset)


CACHES = {"cpu": CPUCache(), "flash-LBNHC": FlashCache("LBNHC"),
          "flash-BLNHC": FlashCache("BLNHC"), "flash-LBHNC": FlashCache("LBHNC")}


class FakeEngine:
    """One worker's KV cache, a scheduler's block table and the page runtime."""

    def __init__(self, sparse=False, host_pages=64, policy="arkvale", layout=LAYOUT,
                 runtime=None, cache=CACHES["cpu"], ops=None, observation_window=0,
                 per_head=False):
        self.cache = cache
        self.kv = cache.caches()
        self.free = list(range(1, NUM_BLOCKS))
        self.tables: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.fmt = cache.fmt
        self.store = HostPageStore(host_pages, LAYERS)
        self.store.bind(self.kv[0], self.fmt, KV_HEADS, HEAD_DIM)
        self.layout = layout
        self.runtime = runtime or PageRuntime(
            layout, get_policy(policy), "cuboid-mean", sparse, self.store, self.fmt, LAYERS, ops,
            observation_window=observation_window, per_head=per_head)
        self.runtime.bind(self.kv[0], KV_HEADS, HEAD_DIM, 1.0)
        # Seeded here: the outcome must not depend on which tests ran before in the process.
        self.rng = torch.Generator().manual_seed(0)
        self.page_keys = torch.randn(200, HEAD_DIM, generator=self.rng)  # page p's keys: near it

    def step(self, batch: dict[str, int], prompts: dict[str, int], favour: dict[str, int]):
        """Run one step: ``batch`` maps request -> tokens to compute; ``favour`` the page whose
        keys each request's last query should point at (or a tuple: one page per KV head)."""
        rows, first = [], 0
        for req, num_new in batch.items():
            num_computed = self.computed.setdefault(req, 0)
            table = self.tables.setdefault(req, [])
            prefilling = num_computed < prompts[req]
            for p in self.layout.evicted_pages(num_computed, prefilling):  # scheduler frees
                if table[p] is not None:
                    self.free.append(table[p])
                    table[p] = None
            while len(table) < cdiv(num_computed + num_new, BS):
                table.append(self.free.pop(0))
            rows.append(RowInput(req, first, num_computed, num_new, prompts[req],
                                 [b if b is not None else 0 for b in table]))
            first += num_new
        plan = self.runtime.plan_step(rows, "cpu")
        query = torch.zeros(first, KV_HEADS * GROUP, HEAD_DIM)
        for row in rows:  # write the row's KV in every layer, as the backend's cache update does
            tokens = torch.arange(row.num_computed, row.num_computed + row.num_new)
            pages = tokens // BS
            table = self.tables[row.req_id]
            slots = torch.tensor([table[p] for p in pages.tolist()]) * BS + tokens % BS
            for layer in range(LAYERS):
                noise = torch.randn(len(tokens), HEAD_DIM, generator=self.rng)
                keys = self.page_keys[pages] + 0.01 * noise
                keys = keys.unsqueeze(1).expand(-1, KV_HEADS, -1)
                values = (pages + 100 * layer).float().view(-1, 1, 1).expand(-1, KV_HEADS,
                                                                              HEAD_DIM)
                self.cache.write(self.kv[layer], slots, keys, values)
            last = row.first_token + row.num_new - 1
            pages = favour.get(row.req_id, 0)
            pages = pages if isinstance(pages, tuple) else (pages,) * KV_HEADS
            query[last] = 10 * self.page_keys[list(pages)].repeat_interleave(GROUP, dim=0)
        tables = {}
        # As the backend: layers run page work only for a plan that has some.
        for layer in range(LAYERS if plan.has_layer_work else 0):
            attended = self.runtime.before_attention(layer, query, self.kv[layer], plan)
            tables[layer] = {}
            if attended is not None:  # what the kernel reads: cdiv(seq_len, BS) blocks per row
                for row, blocks in zip(*attended):
                    num_blocks = cdiv(plan.sparse_seq_lens[int(row)], BS)
                    tables[layer][int(row)] = blocks[:num_blocks]
            self.runtime.after_attention(layer, query, self.kv[layer], plan)
        for row in rows:
            self.computed[row.req_id] += row.num_new
        return plan, tables

    def page_in_block(self, layer: int, block: int, head: int | None = None) -> int:
        """The page a block holds in ``layer`` (every head, or ``head``), read from the cache
        itself."""
        values = self.cache.value(self.kv[layer], block, 0)
        if head is not None:
            values = values[head]
        assert (values == values.flatten()[0]).all()
        return int(values.flatten()[0]) - 100 * layer

    def held_by_content(self, req: str, layer: int, head: int | None = None) -> list[int]:
        state = self.runtime.requests[req]
        return [self.page_in_block(layer, b, head) for b in state.block_ids]

    def check_invariants(self, req: str) -> None:
        state = self.runtime.requests[req]
        for head in range(state.heads):
            self._check_placement(req, head if state.heads > 1 else None)

    def _check_placement(self, req: str, head: int | None) -> None:
        state = self.runtime.requests[req]
        seq_len = self.computed[req]
        num_full = seq_len // BS
        for layer in range(LAYERS):
            held = state.held[layer, :, head or 0].tolist()
            assert held == self.held_by_content(req, layer, head)  # the table is the truth
            full = [p for p, pos in zip(held, state.positions) if pos < num_full]
            assert len(set(full)) == len(full)
            for p in range(self.layout.sink_pages):
                assert held[state.positions.index(p)] == p
            if seq_len % BS:
                assert held[-1] == num_full  # the page being filled, last
