"""Evict-only pages ranked by attention statistics (h2o, tova, roco, snapkv, lra, lfa), driven
like vLLM drives them (the fake scheduler of ``test_pages``: a block's values name the page it
holds)."""
import dataclasses

import pytest
import torch

from tests.fake_engine import BS, CACHES, GROUP, HEAD_DIM, KV_HEADS, LAYERS, CPUCache, FakeEngine
from vllm_kvevict.algorithms.attention_stats import (PageAttentionStats, accumulate,
                                                     page_attention_mass)
from vllm_kvevict.algorithms.selection import topk_prefer_recent
from vllm_kvevict.attention_pages import AttentionStatsRuntime
from vllm_kvevict.pages.keys import BlockKeys
from vllm_kvevict.pages.ops import CompiledCPUPageOps, PageOps
from vllm_kvevict.pages import CPUBlockFormat
from vllm_kvevict.paging import PageLayout
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.tova import TOVA

# 6 pages: 1 sink, 1 window, 4 by statistics.
LAYOUT = PageLayout(block_size=BS, budget_pages=6, sink_pages=1, window_pages=1, top_k_pages=4)


def engine(policy: str, observation_window: int = 4, cache=CACHES["cpu"]) -> FakeEngine:
    runtime = AttentionStatsRuntime(LAYOUT, get_policy(policy), cache.fmt, LAYERS,
                                    observation_window)
    runtime.bind(None, 1, HEAD_DIM, HEAD_DIM ** -0.5)
    return FakeEngine(layout=LAYOUT, runtime=runtime, cache=cache)


def held_pages(eng: FakeEngine, req: str = "a") -> list[set[int]]:
    state = eng.runtime.requests[req]
    return [set(state.held[layer, :, 0].tolist()) for layer in range(LAYERS)]


@pytest.mark.parametrize("policy", ["h2o", "tova", "roco", "snapkv", "lra", "lfa"])
def test_prompt_end_keeps_the_page_the_last_queries_attend_to(policy, cache):
    eng = engine(policy, cache=cache)
    # 10 pages of prompt; the last query points at page 2, which lies in the range the
    # scheduler frees after the prompt (pages 1..4): it is moved into a block that stays.
    plan, _ = eng.step({"a": 10 * BS}, {"a": 10 * BS}, favour={"a": 2})
    assert [obs.num_queries for obs in plan.observed] == [4]
    plan, _ = eng.step({"a": 1}, {"a": 10 * BS}, favour={"a": 2})  # after the scheduler's frees
    eng.check_invariants("a")
    for pages in held_pages(eng):  # 7 blocks: sink, 4 best pages, window, the page being filled
        assert len(pages) == 7 and {0, 2, 9, 10} <= pages
    assert len(eng.runtime.requests["a"].block_ids) <= LAYOUT.max_resident_pages


@pytest.mark.parametrize("policy", ["h2o", "tova", "roco", "lra", "lfa"])
def test_decode_keeps_the_attended_page_within_budget(policy, cache):
    eng = engine(policy, cache=cache)
    prompt = 10 * BS
    eng.step({"a": prompt}, {"a": prompt}, favour={"a": 2})
    for _ in range(3 * BS):
        plan, _ = eng.step({"a": 1}, {"a": prompt}, favour={"a": 2})
        if all(obs.survivors is None for obs in plan.observed):  # else: before the frees
            eng.check_invariants("a")
        assert len(eng.runtime.requests["a"].block_ids) <= LAYOUT.max_resident_pages
        for pages in held_pages(eng):
            assert 2 in pages and 0 in pages
    assert eng.runtime.stats.evicted > 0


def test_snapkv_votes_once_and_generated_pages_leave_with_the_window():
    eng = engine("snapkv")
    prompt = 10 * BS
    eng.step({"a": prompt}, {"a": prompt}, favour={"a": 2})
    eng.step({"a": 1}, {"a": prompt}, favour={"a": 11})
    for _ in range(3 * BS - 1):  # pages 10, 11, 12 are generated
        plan, _ = eng.step({"a": 1}, {"a": prompt}, favour={"a": 11})
        assert all(obs.num_queries == 0 for obs in plan.observed)
        if all(obs.survivors is None for obs in plan.observed):
            eng.check_invariants("a")
    eng.step({"a": 1}, {"a": prompt}, {})
    # Prompt pages stay; generated pages 10 and 11 got no votes and left with the window.
    for pages in held_pages(eng):
        assert len(pages) == 7 and {0, 2, 12, 13} <= pages and not {10, 11} & pages


def test_nothing_moves_while_the_budget_covers_the_context():
    eng = engine("h2o")
    eng.step({"a": 3 * BS}, {"a": 3 * BS}, favour={"a": 1})
    for _ in range(2 * BS):
        plan, _ = eng.step({"a": 1}, {"a": 3 * BS}, favour={"a": 1})
        assert all(obs.survivors is None for obs in plan.observed)
    state = eng.runtime.requests["a"]
    assert state.held[0, :, 0].tolist() == state.positions
    assert eng.runtime.stats.evicted == 0


@dataclasses.dataclass(frozen=True)
class TOVAEveryStep(TOVA):
    latest_query_only = False


def test_tova_observing_evicting_steps_only_keeps_what_observing_every_step_keeps():
    """TOVA ranks by the latest query alone, so observing decode queries only where a row evicts
    changes nothing (the page each query favours moves every step)."""
    engines = []
    for policy in (get_policy("tova"), TOVAEveryStep()):
        runtime = AttentionStatsRuntime(LAYOUT, policy, CACHES["cpu"].fmt, LAYERS, 4)
        runtime.bind(None, 1, HEAD_DIM, HEAD_DIM ** -0.5)
        engines.append(FakeEngine(layout=LAYOUT, runtime=runtime, cache=CACHES["cpu"]))
    prompts = {"a": 10 * BS, "b": 9 * BS + 1}
    observed = []
    for step in range(4 * BS):
        batch = prompts if step == 0 else {"a": 1, "b": 1}
        favour = {"a": 1 + step % 7, "b": 2 + step % 5}
        plans = [eng.step(dict(batch), prompts, favour)[0] for eng in engines]
        observed.append([sum(obs.num_queries for obs in plan.observed) for plan in plans])
        for req in prompts:
            assert torch.equal(*(eng.runtime.requests[req].held for eng in engines))
    assert all(every >= only for only, every in observed)
    assert sum(only for only, _ in observed[1:]) < sum(every for _, every in observed[1:]) / 2
    assert engines[0].runtime.stats.evicted == engines[1].runtime.stats.evicted > 0


def test_release_forgets_the_request():
    eng = engine("tova")
    eng.step({"a": 10 * BS}, {"a": 10 * BS}, {})
    eng.runtime.release("a")
    assert eng.runtime.requests == {}


def test_request_recomputed_from_scratch_starts_over():
    eng = engine("h2o")
    prompt = 10 * BS
    eng.step({"a": prompt}, {"a": prompt}, favour={"a": 2})
    eng.step({"a": 1}, {"a": prompt}, favour={"a": 2})
    before = eng.runtime.requests["a"]
    # Preempted, then resumed: the scheduler recomputes the prompt into fresh blocks.
    eng.computed["a"] = 0
    eng.tables["a"] = []
    eng.step({"a": prompt}, {"a": prompt}, favour={"a": 5})
    eng.step({"a": 1}, {"a": prompt}, favour={"a": 5})
    eng.check_invariants("a")
    assert eng.runtime.requests["a"] is not before
    for pages in held_pages(eng):
        assert 5 in pages


class RowByRowRuntime(AttentionStatsRuntime):
    """The reference for the batched path: each row observed (float32 page mass of
    ``format.keys``) and evicted (``topk_prefer_recent``) on its own, in the request's own
    statistics and page table."""

    def after_attention(self, layer, query, kv_cache, plan):
        for obs in plan.observed:
            held, stats = obs.state.held[layer, :, 0], obs.state.attention[layer]
            if obs.num_queries:
                self._observe_row(query, kv_cache, obs, held, stats)
            if obs.survivors is not None:
                self._evict_row(kv_cache, obs, held, stats)

    def _observe_row(self, query, kv_cache, obs, held, stats):
        bs = self.layout.block_size
        keys = self.format.keys(self.format.read(kv_cache, torch.tensor(obs.blocks)))
        key_positions = held.unsqueeze(1) * bs + torch.arange(bs)
        query_positions = torch.arange(obs.num_tokens - obs.num_queries, obs.num_tokens)
        queries = query[obs.first_query:obs.first_query + obs.num_queries]
        mass = page_attention_mass(queries, keys, key_positions, query_positions, self.scale)
        accumulate(stats, held, mass, key_positions, query_positions)

    def _evict_row(self, kv_cache, obs, held, stats):
        layout = self.layout
        cols = obs.num_full_cols
        pages = held[:cols]
        partial = obs.num_tokens % layout.block_size != 0
        window_full = layout.window_pages - (1 if partial else 0)
        pinned = (pages < layout.sink_pages) | (pages >= obs.num_full - window_full)
        view = PageAttentionStats.of(stats[:, pages], pinned, layout.budget_pages)
        scores = self.policy.score(view).float().masked_fill(pinned, float("inf"))
        by_page = torch.argsort(pages)
        kept = torch.zeros(cols, dtype=torch.bool)
        kept[by_page[topk_prefer_recent(scores[by_page], len(obs.survivors))]] = True
        stays = torch.zeros(cols, dtype=torch.bool)
        stays[obs.survivors] = True
        sources = (kept & ~stays).nonzero().squeeze(1)
        free = (stays & ~kept).nonzero().squeeze(1)
        victims = free[torch.argsort(scores[free], stable=True)][:sources.numel()]
        assert victims.numel() == sources.numel()
        blocks = torch.tensor(obs.blocks)
        moved = self.format.read(kv_cache, blocks[sources])
        self.format.write(kv_cache, blocks[victims], moved)
        held[victims] = held[sources]


def key_index(tiles, block=BS, dim=HEAD_DIM):
    """The CPU kernels' key order in tiles ``(tile_t, tile_d)`` (see ``key_tiles``)."""
    tile_t, tile_d = tiles
    t, d = torch.arange(block).unsqueeze(1), torch.arange(dim).unsqueeze(0)
    return ((((t // tile_t) * (dim // tile_d) + d // tile_d) * (tile_t * tile_d)
             + (t % tile_t) * tile_d + d % tile_d).flatten())


class TiledCPUCache(CPUCache):
    """vLLM's CPU cache with a block's keys in the kernels' tiled order (AMX packs ``(16, 2)``
    tiles; here scaled down to the test's blocks), or in an order with no tiles (``None``)."""

    def __init__(self, tiles):
        index = (key_index(tiles) if tiles is not None
                 else torch.randperm(BS * HEAD_DIM, generator=torch.Generator().manual_seed(3)))
        self.fmt = CPUBlockFormat(index)

    def write(self, kv, slots, keys, values):
        index = self.fmt.key_index.view(BS, HEAD_DIM)
        for slot, key, value in zip(slots.tolist(), keys, values):
            block, offset = divmod(slot, BS)
            raw = kv[block].view(KV_HEADS, 2 * BS * HEAD_DIM)
            raw[:, index[offset]] = key
            raw[:, BS * HEAD_DIM:].view(KV_HEADS, BS, HEAD_DIM)[:, offset] = value


# Tiles (2, 2): channel pairs gathered as one word; (4, 1): transposed tiles; None: keys read
# through the block format.
ALL_CACHES = {**CACHES, "cpu-tiles(2,2)": TiledCPUCache((2, 2)),
              "cpu-tiles(4,1)": TiledCPUCache((4, 1)), "cpu-untiled": TiledCPUCache(None)}


@pytest.fixture(params=list(ALL_CACHES))
def any_cache(request):
    return ALL_CACHES[request.param]


def mixed_schedule(decode_steps: int = 2 * BS + 3):
    """Six requests whose prompts end in three steps (windows of 4 queries for a, b, d, e, 2 for
    c's last chunk and 1 for f's), then decode steps with each favouring its own pages: the
    prompts, and the steps (tokens to compute and favoured page per request)."""
    prompts = {"a": 10 * BS, "b": 7 * BS + 2, "c": 3 * BS + 1, "d": 12 * BS + 3, "e": 9 * BS,
               "f": 8 * BS + 1}
    schedule = [({"a": 10 * BS, "b": 7 * BS + 2, "c": 3 * BS - 1, "f": 8 * BS},
                 {"a": 2, "b": 5}),
                ({"a": 1, "b": 1, "c": 2, "e": 9 * BS, "f": 1}, {"a": 3, "c": 1, "f": 6}),
                ({"a": 1, "b": 1, "c": 1, "d": 12 * BS + 3, "e": 1, "f": 1}, {"d": 7, "e": 4})]
    schedule += [({req: 1 for req in prompts}, {"a": 2 + step % 3, "b": 4, "c": step % 2,
                                                 "d": 7 - step % 4, "e": 6, "f": 1})
                 for step in range(decode_steps)]
    return prompts, schedule


def held_back_and_every_step(policy: str, ops: str) -> list[FakeEngine]:
    """Two engines on the CPU cache: queries held back by default (a block's worth), and each
    observed in its own step."""
    engines = []
    for pending_queries in (None, 1):
        runtime = AttentionStatsRuntime(
            LAYOUT, get_policy(policy), CACHES["cpu"].fmt, LAYERS, 4,
            pending_queries=pending_queries,
            ops=PageOps() if ops == "torch" else CompiledCPUPageOps())
        runtime.bind(None, 1, HEAD_DIM, HEAD_DIM ** -0.5)
        engines.append(FakeEngine(layout=LAYOUT, runtime=runtime, cache=CACHES["cpu"]))
    return engines


@pytest.mark.parametrize("ops", ["torch", "compiled"])
@pytest.mark.parametrize("policy", ["h2o", "roco", "lra", "lfa"])
def test_held_back_decode_queries_give_the_statistics_of_observing_every_step(policy, ops):
    """Decode queries held back and observed together when their row evicts or holds a block's
    worth (here mixed with prompt windows and one-query rows in the same pass) give the
    statistics of observing each in its own step, so the same pages are kept, in a fraction of
    the passes."""
    engines = held_back_and_every_step(policy, ops)
    prompts, schedule = mixed_schedule(decode_steps=3 * BS)
    passes = [0, 0]
    seen = {"mixed": 0, "held_back_rows": 0, "full_without_evicting": 0}
    for batch, favour in schedule:
        plans = [eng.step(dict(batch), prompts, favour)[0] for eng in engines]
        held_back, every_step = (eng.runtime.requests for eng in engines)
        for req in batch:
            assert torch.equal(held_back[req].held, every_step[req].held)
        for i, plan in enumerate(plans):
            passes[i] += sum(obs.num_queries > 0 for obs in plan.observed)
        for obs in plans[0].observed:
            if obs.num_queries:  # caught up: the statistics of every query so far
                req = next(r for r, state in held_back.items() if state is obs.state)
                pages = -(-obs.num_tokens // BS)  # capacities grow at different steps
                torch.testing.assert_close(obs.state.attention[..., :pages],
                                           every_step[req].attention[..., :pages])
            if obs.pending_slot is not None:
                seen["full_without_evicting"] += (obs.survivors is None
                                                  and obs.num_queries == BS)
        rows = plans[0].batch
        if rows is not None:
            windows = rows.num_observing - rows.num_single - rows.num_prompt_windows
            seen["held_back_rows"] += windows
            seen["mixed"] += windows >= 1 and rows.num_prompt_windows >= 1
    assert engines[0].runtime.pending_queries == BS  # chosen at the first plan, on CPU
    assert seen["mixed"] >= 1 and seen["held_back_rows"] >= 6
    assert seen["full_without_evicting"] >= 1  # c: within the budget, observed a block at a time
    assert passes[0] * (BS - 1) < passes[1]  # about one pass per row and block of steps
    assert engines[0].runtime.stats.evicted == engines[1].runtime.stats.evicted > 0


def test_queries_are_held_back_on_cpu_only_and_for_policies_that_add_them_up():
    from vllm_kvevict.attention_pages import default_pending_queries

    for policy, expected in {"h2o": BS, "roco": BS, "lra": BS, "lfa": BS, "tova": 1,
                             "snapkv": 1}.items():
        assert default_pending_queries(get_policy(policy), LAYOUT, "cpu") == expected
        assert default_pending_queries(get_policy(policy), LAYOUT, "cuda") == 1


def test_steps_that_only_hold_queries_back_still_store_them():
    """A step whose only page work is holding decode queries back still runs in every layer
    (the plan is not empty), so the queries observed later are the ones the steps computed."""
    engines = held_back_and_every_step("h2o", "compiled")
    prompt = 10 * BS
    holding_only = 0
    for step in range(3 * BS + 1):
        batch = {"a": prompt} if step == 0 else {"a": 1}
        plan = [eng.step(batch, {"a": prompt}, {"a": 1 + step % 5})[0] for eng in engines][0]
        holding_only += not plan.observed and plan.held_back is not None
        assert not plan.empty
        if plan.observed:
            states = [eng.runtime.requests["a"] for eng in engines]
            pages = -(-states[1].num_tokens // BS)
            torch.testing.assert_close(states[0].attention[..., :pages],
                                       states[1].attention[..., :pages])
    assert holding_only >= 2 * BS


@pytest.mark.parametrize("ops", ["torch", "compiled"])
@pytest.mark.parametrize("policy", ["h2o", "tova", "roco", "snapkv", "lra", "lfa"])
def test_batched_rows_match_row_by_row(policy, any_cache, ops):
    """Prompts ending together and alongside decode rows (windows of 4, 2 and 1 queries),
    prompt-end and decode evictions of several rows at once: the same statistics and the same
    pages, in the same blocks, as observing and evicting row by row; with the torch ops and
    with the compiled CPU ones (page masses and statistics in one call per layer)."""
    batched_ops = PageOps() if ops == "torch" else CompiledCPUPageOps()
    engines = []
    for runtime_cls in (AttentionStatsRuntime, RowByRowRuntime):
        # Each decode query observed in its own step (held-back queries: tested below).
        runtime = runtime_cls(LAYOUT, get_policy(policy), any_cache.fmt, LAYERS, 4,
                              ops=batched_ops if runtime_cls is AttentionStatsRuntime else None,
                              pending_queries=1)
        runtime.bind(None, 1, HEAD_DIM, HEAD_DIM ** -0.5)
        engines.append(FakeEngine(layout=LAYOUT, runtime=runtime, cache=any_cache))
    prompts, schedule = mixed_schedule()
    together = {"single": 0, "single_pairs": 0, "windows": 0, "mixed": 0, "evict": 0}
    for batch, favour in schedule:
        for eng in engines:
            plan, _ = eng.step(dict(batch), prompts, favour)
        fast, slow = (eng.runtime.requests for eng in engines)
        for req in batch:
            assert torch.equal(fast[req].held, slow[req].held)
            torch.testing.assert_close(fast[req].attention, slow[req].attention)
            if all(obs.survivors is None for obs in plan.observed):  # else: before the frees
                engines[0].check_invariants(req)
        rows = plan.batch
        if rows is not None:
            windows = rows.num_observing - rows.num_single
            together["single"] += rows.num_single >= 3
            together["single_pairs"] += rows.num_single >= 2
            together["windows"] += windows >= 2
            together["mixed"] += windows >= 1 and rows.num_single >= 1
            together["evict"] += rows.num_evicting >= 2
    assert together["windows"] >= 2  # prompt windows padded together
    assert together["evict"] >= 2  # several rows evicting in one step
    if policy == "tova":  # decode queries observed in evicting steps only
        assert together["single_pairs"] >= 2
    elif policy != "snapkv":
        assert together["single"] >= 2 * BS and together["mixed"] >= 2
    assert engines[0].runtime.stats.evicted == engines[1].runtime.stats.evicted > 0


@pytest.mark.parametrize("tiles", [(2, 2), (4, 1), (1, 8), (4, 8), None], ids=str)
@pytest.mark.parametrize("num_queries", [1, 4])  # thin and wide products
def test_block_keys_multiply_keys_as_the_format_reads_them(tiles, num_queries):
    cache = TiledCPUCache(tiles) if tiles is not None else CPUCache()
    kv = torch.randn(12, KV_HEADS, BS, 2 * HEAD_DIM)
    blocks = torch.tensor([[3, 7, 1], [5, 0, 11]])
    queries = torch.randn(2, num_queries, KV_HEADS * GROUP, HEAD_DIM)
    logits = BlockKeys.of(cache.fmt, kv).logits(kv, blocks, queries, 0.5)
    keys = cache.fmt.keys(cache.fmt.read(kv, blocks.flatten())).unflatten(0, (2, 3))
    expected = 0.5 * torch.einsum("rnhgd,rcthd->rnhgct", queries.unflatten(2, (KV_HEADS, GROUP)),
                                  keys).flatten(-2)
    torch.testing.assert_close(logits, expected)


def test_block_keys_of_flash_layouts(cache):
    kv = cache.caches()[1]
    kv.copy_(torch.randn(kv.shape))
    blocks = torch.tensor([[3, 7], [5, 11]])
    queries = torch.randn(2, 1, KV_HEADS * GROUP, HEAD_DIM)
    logits = BlockKeys.of(cache.fmt, kv).logits(kv, blocks, queries, 0.5)
    keys = cache.fmt.keys(cache.fmt.read(kv, blocks.flatten())).unflatten(0, (2, 2))
    expected = 0.5 * torch.einsum("rnhgd,rcthd->rnhgct", queries.unflatten(2, (KV_HEADS, GROUP)),
                                  keys).flatten(-2)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("policy", ["h2o", "tova", "roco", "snapkv", "lra", "lfa"])
def test_scores_of_a_padded_batch_are_the_rows_scores(policy):
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 4, 9]
    rows = []
    for n in lengths:
        count = torch.randint(1, 4, (n,), generator=gen).float()
        count[1] = 1  # equal (zero) deviations
        total = torch.rand(n, generator=gen) * count
        squares = total * total / count + torch.rand(n, generator=gen) * (count > 1)
        pinned = torch.zeros(n, dtype=torch.bool)
        pinned[[0, n - 1]] = True
        attended = torch.randint(0, 3, (n,), generator=gen).float()
        attended[2] = attended[3]  # equal counts
        rows.append(PageAttentionStats(
            total, squares, count, attended, torch.rand(n, generator=gen),
            torch.randperm(4 * n, generator=gen)[:n].float(), pinned, budget_pages=10))
    width = max(lengths)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.numel()))  # noqa: E731
    valid = torch.stack([pad(torch.ones(n, dtype=torch.bool)) for n in lengths])
    batch = PageAttentionStats(*(torch.stack([pad(getattr(r, f)) for r in rows]) for f in
                                 ("total", "squares", "count", "attended", "last",
                                  "last_attended", "pinned")),
                               budget_pages=10, valid=valid)
    scores = get_policy(policy).score(batch)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        torch.testing.assert_close(scores[i, :n], get_policy(policy).score(row))


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_no_host_sync_per_layer_on_the_cuda_path(policy, monkeypatch):
    """Observation and eviction in every layer make no host sync (CUDA's masked page copy,
    interpreted here); a step makes at most one, the evicting rows' page tables copied back after
    the last layer."""
    from tests.host_syncs import HostSyncCounter
    from vllm_kvevict.pages.ops import TritonPageOps

    cache = CACHES["flash-LBNHC"]
    runtime = AttentionStatsRuntime(LAYOUT, get_policy(policy), cache.fmt, LAYERS, 4,
                                    ops=TritonPageOps())
    runtime.bind(None, 1, HEAD_DIM, HEAD_DIM ** -0.5)
    eng = FakeEngine(layout=LAYOUT, runtime=runtime, cache=cache)
    counter = HostSyncCounter()
    calls = []

    def counted(layer, *args):
        counter.take()
        observe_and_evict(layer, *args)
        calls.append((layer, counter.take()))

    observe_and_evict = runtime.after_attention
    monkeypatch.setattr(runtime, "after_attention", counted)
    prompts = {"a": 10 * BS, "b": 7 * BS + 2}
    evicting_steps = 0
    with counter.install(monkeypatch):
        plan, _ = eng.step(dict(prompts), prompts, {"a": 2, "b": 5})
        for step in range(2 * BS + 3):
            calls_before = len(calls)
            plan, _ = eng.step({"a": 1, "b": 1}, prompts, {"a": 2 + step % 3, "b": 4})
            evicts = plan.batch is not None and plan.batch.num_evicting > 0
            evicting_steps += evicts
            last = [events for layer, events in calls[calls_before:] if layer == LAYERS - 1]
            # (no layer runs page work in a step with none: see FakeEngine.step)
            assert last == ([["cpu"]] if evicts else [[]] if plan.has_layer_work else [])
    assert evicting_steps >= 2
    assert all(events == [] for layer, events in calls if layer < LAYERS - 1), calls
    assert runtime.stats.evicted > 0
