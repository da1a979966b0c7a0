"""Marconi's choice on hand-built prefix trees (no vLLM)."""
import random

import pytest

from vllm_kvevict.prefix_cache.marconi import BlockCost, MarconiIndex
from vllm_kvevict.prefix_cache.tuning import AlphaTuner, replay

BLOCK = 16
COST = BlockCost(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, block_size=BLOCK, bytes_per_block=4096)


def chain(index: MarconiIndex, name: str, first_id: int, length: int, parent=None,
          depth0: int = 0) -> list[int]:
    """Cache a chain of ``length`` blocks (ids from ``first_id``) and return their ids."""
    ids = []
    for i in range(length):
        key = f"{name}{i}"
        index.cache(first_id + i, key, parent, (depth0 + i + 1) * BLOCK)
        parent = key
        ids.append(first_id + i)
    return ids


def free_request(index: MarconiIndex, ids: list[int]) -> None:
    for block_id in reversed(ids):  # as vLLM frees a request's blocks: tail first
        index.free(block_id)
    index.check()


def test_block_cost_matches_a_direct_sum_and_grows_with_depth():
    for end in (BLOCK, 5 * BLOCK, 40 * BLOCK):
        direct = sum(COST.linear_flops_per_token
                     + 4 * COST.num_layers * COST.num_heads * COST.head_dim * (p + 1)
                     for p in range(end - BLOCK, end))
        assert COST.flops(end) == direct
    efficiencies = [COST.efficiency(k * BLOCK) for k in range(1, 10)]
    assert efficiencies == sorted(efficiencies) and efficiencies[0] < efficiencies[-1]


@pytest.mark.parametrize("alpha, victim", [(0.0, "deep"), (0.5, "deep"), (0.99, "deep"),
                                           (1.01, "shallow"), (1.5, "shallow"),
                                           (2.0, "shallow")])
def test_recency_against_depth_as_alpha_moves(alpha, victim):
    """An old deep leaf vs a recent shallow one: U(deep) = alpha * 1, U(shallow) = 1 + 0, so
    the deep one goes below alpha = 1 and the shallow one above."""
    index = MarconiIndex(COST.efficiency, alpha)
    deep = chain(index, "d", 0, 6)
    shallow = chain(index, "s", 10, 1)
    free_request(index, deep)
    free_request(index, shallow)
    assert index.candidates() == {deep[-1], shallow[0]}
    expected = deep[-1] if victim == "deep" else shallow[0]
    assert index.pop_victim() == expected


def test_chain_is_given_up_from_its_tail_whatever_alpha():
    for alpha in (0.0, 1.0, 100.0):
        index = MarconiIndex(COST.efficiency, alpha)
        ids = chain(index, "a", 0, 5)
        free_request(index, ids)
        assert index.candidates() == {ids[-1]}
        order = [index.pop_victim() for _ in ids]
        index.check()
        assert order == ids[::-1]
        assert index.pop_victim() is None


def test_branch_point_waits_for_all_its_children():
    index = MarconiIndex(COST.efficiency, 0.0)
    trunk = chain(index, "t", 0, 2)
    left = chain(index, "l", 2, 2, parent="t1", depth0=2)
    right = chain(index, "r", 4, 1, parent="t1", depth0=2)
    free_request(index, trunk + left)
    free_request(index, right)
    assert index.candidates() == {left[-1], right[0]}
    taken = [index.pop_victim() for _ in range(5)]
    index.check()
    # trunk blocks come last: t1 only once l0 (and l1) and r0 are gone
    assert taken[-2:] == [trunk[1], trunk[0]]
    assert taken.index(left[0]) > taken.index(left[1])


def test_candidates_follow_cache_touch_free_and_uncache():
    index = MarconiIndex(COST.efficiency, 1.0)
    parent = chain(index, "p", 0, 1)
    assert index.candidates() == set()  # cached but held by a request
    free_request(index, parent)
    assert index.candidates() == {0}
    chain(index, "c", 1, 1, parent="p0", depth0=1)  # a running request extends it
    assert index.candidates() == set() and index.is_free(0)
    index.check()
    index.touch(0)  # a new request hits the parent
    assert not index.is_free(0)
    index.free(1)
    index.free(0)
    assert index.candidates() == {1}
    index.check()
    assert index.uncache(1)  # the child's key dropped (a free cached block)
    assert index.candidates() == {0}
    index.check()
    assert index.pop_victim() == 0 and index.num_free == 0


@pytest.mark.parametrize("classes_per_octave", [None, 4, 1])
def test_choice_equals_a_brute_force_argmin_on_random_traffic(classes_per_octave):
    rng = random.Random(0)
    for alpha in (0.0, 0.3, 1.0, 2.0):
        index = MarconiIndex(COST.efficiency, alpha, classes_per_octave)
        chains: dict[int, str] = {}  # block id -> key
        next_id = 0
        for step in range(600):
            op = rng.random()
            free = index.free_blocks()
            if op < 0.4 or not free:
                # a request: extend an existing cached key (or start a root) with 1-3 blocks
                cached = [b for b in chains if index.is_cached(b)]
                parent = chains[rng.choice(cached)] if cached and rng.random() < 0.7 else None
                depth = 0 if parent is None else parent.count("/") + 1
                ids = []
                for _ in range(rng.randint(1, 3)):
                    key = f"{parent or ''}/{next_id}"
                    index.cache(next_id, key, parent, (depth + 1) * BLOCK)
                    chains[next_id] = key
                    ids.append(next_id)
                    parent, depth, next_id = key, depth + 1, next_id + 1
                free_request(index, ids)
            elif op < 0.55:
                index.touch(rng.choice(free))
                # and give it back later, as a finished request does
                held = [b for b in chains if index.is_cached(b) and not index.is_free(b)]
                index.free(rng.choice(held))
            else:
                expected = _brute_force(index, alpha)
                assert index.pop_victim() == expected, f"step {step}"
            index.check()


def _brute_force(index: MarconiIndex, alpha: float) -> int:
    free = index.free_blocks()
    has_child = set(index._parent.values())
    leaves = [b for b in free if index.key_of(b) not in has_child]
    assert leaves, "no leaf among free blocks"
    stamps = [index.free_stamp(b) for b in leaves]
    def efficiency(block_id):
        return COST.efficiency(index._depth_class(index._tokens[block_id]))

    effs = [efficiency(b) for b in leaves]
    r_span = (max(stamps) - min(stamps)) or 1
    e_span = (max(effs) - min(effs)) or 1.0
    utility = {b: (index.free_stamp(b) - min(stamps)) / r_span
               + alpha * (efficiency(b) - min(effs)) / e_span
               for b in leaves}
    best = min(utility.values())
    # float rounding: the index ranks by an equivalent rescaled sum
    near = [b for b in leaves if utility[b] - best < 1e-9]
    return min(near, key=index.free_stamp)


def _churn_trace() -> list[list[str]]:
    """A deep shared document revisited between one-off prompts that churn a small pool."""
    document = [f"doc{i}" for i in range(8)]
    trace = []
    for visit in range(6):
        trace.append(document)
        for k in range(2):
            trace.append([f"once{visit}.{k}.{i}" for i in range(3)])
    return trace


def test_replay_favours_deep_blocks_when_shallow_churn_evicts_them():
    trace = _churn_trace()
    lru_like = replay(trace, 0.0, 12, BLOCK, COST.efficiency, COST.flops)
    marconi = replay(trace, 2.0, 12, BLOCK, COST.efficiency, COST.flops)
    assert marconi > lru_like > 0


def test_tuner_adopts_the_alpha_that_saved_most():
    tuner = AlphaTuner(capacity=12, block_size=BLOCK, efficiency=COST.efficiency,
                       flops=COST.flops, window=len(_churn_trace()))
    due = [tuner.record(f"r{i}", c) for i, c in enumerate(_churn_trace())]
    assert due == [False] * (len(due) - 1) + [True]
    alpha = tuner.tune()
    scores = tuner.last_scores
    assert alpha > 0 and scores[alpha] == max(scores.values()) > scores[0.0]
    assert not tuner.record("r0", ["x"])  # a request seen before is not new
