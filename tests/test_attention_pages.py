"""Evict-only pages ranked by attention statistics (h2o, tova, roco, snapkv), driven like vLLM
drives them (the fake scheduler of ``test_pages``: a block's values name the page it holds)."""
import pytest
import torch

from tests.test_pages import BS, CACHES, HEAD_DIM, LAYERS, FakeEngine, cache  # noqa: F401
from vllm_kvevict.attention_pages import AttentionStatsRuntime
from vllm_kvevict.paging import PageLayout
from vllm_kvevict.policies import get_policy

# 6 pages: 1 sink, 1 window, 4 by statistics.
LAYOUT = PageLayout(block_size=BS, budget_pages=6, sink_pages=1, window_pages=1, top_k_pages=4)


def engine(policy: str, observation_window: int = 4, cache=CACHES["cpu"]) -> FakeEngine:
    runtime = AttentionStatsRuntime(LAYOUT, get_policy(policy), cache.fmt, LAYERS,
                                    observation_window)
    runtime.bind(None, 1, HEAD_DIM, HEAD_DIM ** -0.5)
    return FakeEngine(layout=LAYOUT, runtime=runtime, cache=cache)


def held_pages(eng: FakeEngine, req: str = "a") -> list[set[int]]:
    state = eng.runtime.requests[req]
    return [set(state.held[layer].tolist()) for layer in range(LAYERS)]


@pytest.mark.parametrize("policy", ["h2o", "tova", "roco", "snapkv"])
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


@pytest.mark.parametrize("policy", ["h2o", "tova", "roco"])
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
    assert state.held[0].tolist() == state.positions
    assert eng.runtime.stats.evicted == 0


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
    """The same runtime observing every row on its own (the reference for the batched path)."""

    def plan_step(self, rows, device):
        plan = super().plan_step(rows, device)
        for obs in plan.observed:
            obs.decode_index = None
        plan.decode, plan.per_row = None, plan.observed
        return plan


@pytest.mark.parametrize("policy", ["h2o", "tova", "roco"])
def test_decode_rows_observed_together_match_row_by_row(policy, cache):
    engines = []
    for runtime_cls in (AttentionStatsRuntime, RowByRowRuntime):
        runtime = runtime_cls(LAYOUT, get_policy(policy), cache.fmt, LAYERS, 4)
        runtime.bind(None, 1, HEAD_DIM, HEAD_DIM ** -0.5)
        engines.append(FakeEngine(layout=LAYOUT, runtime=runtime, cache=cache))
    prompts = {"a": 10 * BS, "b": 7 * BS + 2, "c": 3 * BS + 1}
    for eng in engines:
        eng.step(dict(prompts), prompts, favour={"a": 2, "b": 5, "c": 1})
    batched = 0
    for step in range(2 * BS + 3):
        for eng in engines:
            plan, _ = eng.step({"a": 1, "b": 1, "c": 1}, prompts,
                               favour={"a": 2 + step % 3, "b": 4, "c": step % 2})
            batched += plan.decode is not None and len(plan.decode.observers) == 3
        fast, slow = (eng.runtime.requests for eng in engines)
        for req in prompts:
            assert torch.equal(fast[req].held, slow[req].held)
            torch.testing.assert_close(fast[req].attention, slow[req].attention)
            if all(obs.survivors is None for obs in plan.observed):  # else: before the frees
                engines[0].check_invariants(req)
    assert batched == 2 * BS + 3  # every step observed the three rows together
