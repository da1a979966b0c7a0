"""The token-level references, and the page-level replay of the engine's decisions."""
import pytest
import torch

from vllm_kvevict.algorithms.token_reference import (kept_overlap, page_level_keep,
                                                     token_level_keep)
from vllm_kvevict.policies import get_policy


def _inputs(num_tokens=48, kv_heads=1, group=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_tokens, kv_heads, dim, generator=gen)
    queries = torch.randn(num_tokens, kv_heads * group, dim, generator=gen)
    return queries, keys


def test_h2o_reference_keeps_the_heaviest_tokens_by_hand():
    # One head; 6 tokens; the last 2 prompt queries look only at token 2 (and themselves).
    keys = torch.zeros(6, 1, 2)
    keys[2, 0] = torch.tensor([10.0, 0])
    queries = torch.zeros(6, 1, 2)
    queries[3:5, 0] = torch.tensor([1.0, 0])
    kept = token_level_keep("h2o", queries, keys, prompt_len=5, budget=3, sink=1, window=1,
                            observation_window=2, scale=1.0)
    # Sink 0, the heavy token 2 and the window (token 4); then token 5 arrives and the
    # lightest unpinned token (4, no longer in the window) goes.
    assert kept[0].nonzero().squeeze(1).tolist() == [0, 2, 5]


def _pointing_queries(targets: dict[int, int], num_tokens: int = 8):
    """One head, token ``i``'s key ``e_i``; the query at position ``t`` points at token
    ``targets[t]`` (a strong logit for it, 0 for the others), or at nothing."""
    keys = torch.eye(num_tokens).unsqueeze(1)
    queries = torch.zeros(num_tokens, 1, num_tokens)
    for t, target in targets.items():
        queries[t, 0, target] = 20.0
    return queries, keys


def test_lra_evicts_the_token_attended_least_recently_by_hand():
    # Prompt of 6, budget 4, sink 1, window 1, observation window 3 (queries 3, 4, 5).
    # Token 2 is attended at 3, token 1 at 4 and token 3 at 5: at the prompt's end tokens 1..4
    # compete for 2 places (sink 0 and window 5 pinned): latest uses 4 (token 1), 3 (token 2),
    # 5 (token 3), 4 (token 4, written at 4): 3 and the more recent of 1 and 4 stay.
    queries, keys = _pointing_queries({3: 2, 4: 1, 5: 3, 6: 3, 7: 1})
    kept = token_level_keep("lra", queries, keys, prompt_len=6, budget=4, sink=1, window=1,
                            observation_window=3, scale=1.0)
    # Token 6 arrives (its query attends 3): 4 (last use 4) goes, not 3 (6) or 5 (written at
    # 5); token 7 arrives (its query points at 1, not kept, so attends nothing): 5 goes.
    assert kept[0].nonzero().squeeze(1).tolist() == [0, 3, 6, 7]


def test_lfa_evicts_the_token_attended_least_often_by_hand():
    queries, keys = _pointing_queries({3: 2, 4: 2, 5: 1, 6: 1, 7: 1})
    kept = token_level_keep("lfa", queries, keys, prompt_len=6, budget=4, sink=1, window=1,
                            observation_window=3, scale=1.0)
    # Prompt's end: token 2 attended twice, token 1 once, 3 and 4 never: 2 and 1 stay. Then
    # 6 and 7 arrive: 5 and then 6, never attended, go as they leave the window; 2 (attended
    # twice) and 1 (three times) stay.
    assert kept[0].nonzero().squeeze(1).tolist() == [0, 1, 2, 7]


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "lra", "lfa"])
def test_pages_of_one_token_and_one_head_reproduce_the_reference(name):
    """With single-token pages and one KV head, only the granularity differs, and there is none."""
    queries, keys = _inputs()
    args = (queries, keys, 32, 12, 2, 3, 8, 8 ** -0.5)
    token_kept = token_level_keep(name, *args)
    page_kept = page_level_keep(get_policy(name), *args, page_size=1)
    assert torch.equal(token_kept, page_kept)
    assert int(token_kept.sum()) == 12 and kept_overlap(token_kept, page_kept) == 1.0


@pytest.mark.parametrize("name", ["h2o", "tova", "roco", "snapkv", "lra", "lfa"])
def test_page_level_respects_the_budget_and_pins(name):
    queries, keys = _inputs(num_tokens=100, kv_heads=2)
    page_kept = page_level_keep(get_policy(name), queries, keys, 70, 32, 8, 8, 8, 0.3,
                                page_size=8)
    kept = page_kept[0]
    assert int(kept.sum()) <= 32 + 7  # the budget's pages plus the page being filled
    assert kept[:8].all() and kept[-4:].all()  # sink page, window (the last page: 96..99)
    token_kept = token_level_keep(name, queries, keys, 70, 32, 8, 8, 8, 0.3)
    assert (token_kept.sum(1) == 32).all()
    assert 0 < kept_overlap(token_kept, page_kept) <= 1
