"""The page life (fill -> backup -> evict -> recall) in plain torch, driven like vLLM drives it.

Driven by :class:`tests.fake_engine.FakeEngine`: a fake scheduler hands out and frees blocks as
the real manager does, and a block's content names the page it holds, so the per-layer page
tables are checked against the cache itself.

Each engine test runs on vLLM's CPU cache and on vLLM 0.32's FlashAttention cache (CPU tensors
with the CUDA layout's strides, written through the backend's own cache update): the CUDA path's
block format, host store and runtime, exercised without a GPU.
"""
import pytest
import torch

from tests.fake_engine import BS, KV_HEADS, LAYERS, LAYOUT, FakeEngine
from vllm_kvevict.algorithms.digest import digest_dtype, stored_digests
from vllm_kvevict.pages import CPUBlockFormat, HostPageStore, HostStoreFull
from vllm_kvevict.paging import PageLayout

def held_pages(state, layer: int) -> list[int]:
    """The page each owned block holds in ``layer`` (one placement per block)."""
    assert state.heads == 1
    return state.held[layer, :, 0].tolist()


def test_prompt_within_budget_backs_up_but_never_selects(cache):
    engine = FakeEngine(cache=cache)
    plan, _ = engine.step({"a": 18}, {"a": 18}, {})
    assert plan.backup_blocks.numel() == 4 and not plan.selections and not plan.prefill_ends
    assert engine.store.used_pages == 4
    for _ in range(3):
        plan, _ = engine.step({"a": 1}, {"a": 18}, {"a": 1})
        assert not plan.selections
    assert engine.runtime.stats.recalled == 0
    engine.check_invariants("a")


def test_digests_match_the_backed_up_keys(cache):
    engine = FakeEngine(cache=cache)
    engine.step({"a": 8}, {"a": 8}, {})
    state = engine.runtime.requests["a"]
    for layer in range(LAYERS):
        host = engine.store.pages[layer][state.host_ids[1]]
        assert torch.equal(host, engine.kv[layer][engine.tables["a"][1]])
        keys = engine.fmt.keys(host.unsqueeze(0))[0]  # [BS, kv, d]
        centre = (keys.amax(0) + keys.amin(0)) / 2
        radius = (keys - centre).abs().mean(0)
        digest = engine.store.digests[layer][state.host_ids[1]]
        assert digest.dtype == digest_dtype(host.dtype)
        assert torch.equal(digest, stored_digests(centre + radius, centre - radius, digest.dtype))


def test_prefill_end_keeps_the_best_pages_and_decode_recalls_evicted_ones(cache):
    engine = FakeEngine(cache=cache)
    prompt = 12 * BS + 2  # 12 full pages + a partial one; budget 6 pages
    engine.step({"a": prompt}, {"a": prompt}, {"a": 3})  # last prompt query favours page 3
    assert engine.runtime.requests["a"].held is not None
    for layer in range(LAYERS):  # page 3 moved into a block that stays owned
        after = LAYOUT.evicted_pages(prompt, prefilling=False)
        state = engine.runtime.requests["a"]
        kept = [h for h, pos in zip(held_pages(state, layer), state.positions)
                if pos not in after]
        assert 3 in kept
    recalled_before = engine.runtime.stats.recalled
    for favour in (3, 5, 7, 5, 9, 2):
        plan, _ = engine.step({"a": 1}, {"a": prompt}, {"a": favour})
        assert plan.selections
        engine.check_invariants("a")
        state = engine.runtime.requests["a"]
        for layer in range(LAYERS):
            assert favour in held_pages(state, layer)
        assert len(state.positions) <= LAYOUT.max_resident_pages
    assert engine.runtime.stats.recalled > recalled_before
    engine.runtime.release("a")
    assert engine.store.used_pages == 0 and not engine.runtime.requests


def test_anchors_keep_what_the_prompts_last_queries_attend_to(cache):
    engine = FakeEngine(cache=cache, observation_window=2)
    assert engine.runtime.anchor_pages == 2  # budget 6 = 1 sink + 1 window + 2 anchors + top-2
    prompt = 12 * BS + 2
    engine.step({"a": prompt}, {"a": prompt}, {"a": 5})  # the last prompt query favours page 5
    state = engine.runtime.requests["a"]
    assert state.anchors.shape == (LAYERS, 1, 2)
    # the most attended page and the page after it (text cut by the boundary stays whole)
    assert [set(a) for a in state.anchors[:, 0].tolist()] == [{5, 6}] * LAYERS
    assert all(0 < p < 12 for p in state.anchors.flatten().tolist())  # neither sink nor window
    for favour in (8, 3, 9, 1, 7):  # decode queries favour other pages: anchors stay
        plan, _ = engine.step({"a": 1}, {"a": prompt}, {"a": favour})
        window_full = 0 if engine.computed["a"] % BS else 1  # the window counts a partial page
        assert plan.selections.num_keep.tolist() == [1 + window_full + 2 + 2]
        for layer in range(LAYERS):
            held = engine.held_by_content("a", layer)
            assert set(state.anchors[layer, 0].tolist()) <= set(held)
            assert favour in held
        engine.check_invariants("a")
    assert engine.runtime.stats.recalled > 0


def test_per_head_selection_gives_each_kv_head_its_own_pages(cache):
    engine = FakeEngine(cache=cache, per_head=True, observation_window=2)
    assert engine.runtime.page_heads == KV_HEADS
    prompt = 12 * BS + 2
    engine.step({"a": prompt}, {"a": prompt}, {"a": (5, 9)})  # each head's last query
    state = engine.runtime.requests["a"]
    assert state.held.shape[2] == KV_HEADS and state.anchors.shape == (LAYERS, KV_HEADS, 2)
    anchors = [[set(a) for a in heads] for heads in state.anchors.tolist()]
    assert anchors == [[{5, 6}, {9, 10}]] * LAYERS
    for favour in ((3, 8), (8, 3), (2, 10), (6, 1)):
        engine.step({"a": 1}, {"a": prompt}, {"a": favour})
        engine.check_invariants("a")
        for layer in range(LAYERS):
            for head, page in enumerate(favour):
                assert page in engine.held_by_content("a", layer, head)
                assert set(state.anchors[layer, head].tolist()) <= set(state.held[layer, :, head]
                                                                       .tolist())
    assert not torch.equal(state.held[..., 0], state.held[..., 1])  # heads hold different pages
    assert len(state.positions) <= LAYOUT.max_resident_pages
    assert engine.runtime.stats.recalled > 0
    engine.runtime.release("a")
    assert engine.store.used_pages == 0


def test_per_head_selection_is_off_under_sparse_attention():
    assert not FakeEngine(per_head=True, sparse=True).runtime.per_head
    assert FakeEngine(per_head=True, sparse=True).runtime.page_heads == 1


def test_sparse_attention_has_no_anchors(cache):
    engine = FakeEngine(cache=cache, observation_window=2, sparse=True)
    assert engine.runtime.anchor_pages == 0


def test_decode_across_page_boundaries_keeps_the_window_and_sinks(cache):
    engine = FakeEngine(cache=cache)
    prompt = 9 * BS
    engine.step({"a": prompt}, {"a": prompt}, {"a": 4})
    for step in range(3 * BS + 1):
        engine.step({"a": 1}, {"a": prompt}, {"a": 2 + step % 5})
        engine.check_invariants("a")
        state = engine.runtime.requests["a"]
        num_full = engine.computed["a"] // BS
        window_page = num_full - 1 if engine.computed["a"] % BS == 0 else num_full
        for layer in range(LAYERS):
            assert window_page in held_pages(state, layer)
    assert engine.store.used_pages == engine.computed["a"] // BS


def test_sparse_attention_tables_list_exactly_the_selected_pages(cache):
    engine = FakeEngine(sparse=True, cache=cache)
    prompt = 10 * BS + 1
    engine.step({"a": prompt}, {"a": prompt}, {"a": 6})
    plan, tables = engine.step({"a": 1}, {"a": prompt}, {"a": 6})
    seq_len = prompt + 1
    selected = LAYOUT.selected_pages(seq_len // BS, True)
    assert plan.sparse_seq_lens == {0: selected * BS + seq_len % BS}
    for layer in range(LAYERS):
        blocks = tables[layer][0].tolist()
        assert len(blocks) == selected + 1
        assert blocks[-1] == engine.tables["a"][seq_len // BS]  # the page being filled last
        pages = [engine.page_in_block(layer, b) for b in blocks]
        assert 6 in pages and 0 in pages and len(set(pages)) == len(pages)


def test_batch_of_requests_joining_and_leaving(cache):
    engine = FakeEngine(cache=cache)
    prompts = {"a": 10 * BS + 3, "b": 7 * BS, "c": 3 * BS + 1}
    engine.step({"a": prompts["a"], "b": prompts["b"]}, prompts, {"a": 2, "b": 4})
    engine.step({"a": 1, "b": 1, "c": prompts["c"]}, prompts, {"a": 5, "b": 1})
    for _ in range(6):
        engine.step({"a": 1, "b": 1, "c": 1}, prompts, {"a": 5, "b": 3, "c": 1})
        for req in prompts:
            engine.check_invariants(req)
    engine.runtime.release("b")
    engine.step({"a": 1, "c": 1}, prompts, {"a": 7})
    engine.check_invariants("a")
    assert set(engine.runtime.requests) == {"a", "c"}
    # A request recomputed from scratch (preempted, then resumed) starts over.
    engine.computed["a"] = 0
    engine.tables["a"] = []
    engine.step({"a": prompts["a"]}, prompts, {"a": 2})
    engine.step({"a": 1}, prompts, {"a": 2})
    engine.check_invariants("a")
    for req in ("a", "c"):
        engine.runtime.release(req)
    assert engine.store.used_pages == 0


def test_host_store_refuses_beyond_capacity():
    store = HostPageStore(3, LAYERS)
    ids = store.allocate(2)
    with pytest.raises(HostStoreFull):
        store.allocate(2)
    store.release(ids)
    assert sorted(store.allocate(3)) == [0, 1, 2]


def test_selection_probe_compares_digest_and_exact_top_k():
    from vllm_kvevict.pages import SelectionProbe

    keys = torch.zeros(6, 2, 1, 2)
    keys[3, :, 0] = torch.tensor([5.0, 0.0])  # page 3 takes nearly all attention
    keys[4, :, 0] = torch.tensor([1.0, 0.0])
    query = torch.tensor([[4.0, 0.0]])
    pinned = torch.tensor([True, False, False, False, False, True])  # sink and window
    probe = SelectionProbe()
    probe.record(query, keys, torch.tensor([9.0, 0, 1, 5, 2, 9]), pinned, top_k=2)  # digest: 3, 4
    probe.record(query, keys, torch.tensor([9.0, 3, 4, 0, 2, 9]), pinned, top_k=2)  # digest: 2, 1
    assert probe.selections == 2 and probe.top1_hits == 1
    assert probe.top_k_overlap == pytest.approx(1.0)  # 2/2 then 0/2
    anchored = pinned.clone()
    anchored[3] = True  # an anchor: the digest is judged on the other pages
    probe.record(query, keys, torch.tensor([9.0, 3, 0, 0, 4, 9]), anchored, top_k=2)  # 4, 1
    assert probe.selections == 3 and probe.top1_hits == 2  # page 4 is now the heaviest


def test_quest_keeps_every_page_and_attends_over_the_selection(cache):
    layout = PageLayout(block_size=BS, budget_pages=100, sink_pages=1, window_pages=1,
                        top_k_pages=2)
    engine = FakeEngine(policy="quest", layout=layout, host_pages=0, cache=cache)
    prompt = 10 * BS + 1
    engine.step({"a": prompt}, {"a": prompt}, {"a": 6})
    plan, tables = engine.step({"a": 1}, {"a": prompt}, {"a": 6})
    seq_len = prompt + 1
    selected = layout.selected_pages(seq_len // BS, True)  # 1 sink + 0 full window + 2
    assert plan.sparse_seq_lens == {0: selected * BS + seq_len % BS}
    state = engine.runtime.requests["a"]
    assert state.positions == list(range(11))  # nothing freed, nothing moved
    for layer in range(LAYERS):
        assert held_pages(state, layer) == list(range(11))
        pages = [engine.page_in_block(layer, b) for b in tables[layer][0].tolist()]
        assert pages[-1] == 10 and 0 in pages and 6 in pages and len(pages) == selected + 1
    assert engine.runtime.stats.recalled == 0 and engine.store.used_pages == 0
    engine.runtime.release("a")


@pytest.mark.parametrize("tiles", [(1, 8), (4, 1), (2, 2), None], ids=str)
def test_cpu_key_layouts_read_as_views_or_by_gather(tiles):
    """Keys of a CPU page in a tiled layout (the kernels' ISA-specific orders) read the same
    through views as through the element gather; other orders fall back to the gather."""
    from vllm_kvevict.pages import key_tiles

    block, dim = 4, 8
    t, d = torch.arange(block).unsqueeze(1), torch.arange(dim).unsqueeze(0)
    if tiles is None:
        key_index = torch.randperm(block * dim, generator=torch.Generator().manual_seed(1))
    else:
        tile_t, tile_d = tiles
        key_index = ((((t // tile_t) * (dim // tile_d) + d // tile_d) * (tile_t * tile_d)
                      + (t % tile_t) * tile_d + d % tile_d).flatten())
    assert (key_tiles(key_index, block, dim) is None) == (tiles is None)
    pages = torch.randn(3, 2, block, 2 * dim)
    gathered = (pages.reshape(3, 2, -1)[:, :, :block * dim].index_select(2, key_index)
                .reshape(3, 2, block, dim).permute(0, 2, 1, 3))
    assert torch.equal(CPUBlockFormat(key_index).keys(pages), gathered)
