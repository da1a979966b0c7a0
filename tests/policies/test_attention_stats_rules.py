"""Attention statistics and the scoring rules of h2o, tova, roco and snapkv on hand-computed cases."""
import math

import pytest
import torch

from vllm_kvevict.algorithms.attention_stats import (NUM_STATS, PageAttentionStats, accumulate,
                                                     page_attention_mass)
from vllm_kvevict.policies import get_policy


def test_page_mass_sums_token_probabilities_and_respects_causality():
    # One head, pages of 2 tokens; logits (scale 1) are 0, 0 | ln 3, 0.
    keys = torch.tensor([[0.0, 0], [0, 0], [math.log(3), 0], [0, 0]]).view(2, 2, 1, 2)
    positions = torch.arange(4).view(2, 2)
    query = torch.tensor([[[1.0, 0]], [[1.0, 0]]])  # at positions 3 and 2
    mass = page_attention_mass(query, keys, positions, torch.tensor([3, 2]), scale=1.0)
    # position 3: probabilities 1/6, 1/6, 1/2, 1/6; position 2 sees 3 tokens: 1/5, 1/5, 3/5.
    torch.testing.assert_close(mass, torch.tensor([[1 / 3, 2 / 3], [2 / 5, 3 / 5]]))


def test_page_mass_averages_the_query_heads_of_a_group():
    keys = torch.tensor([[math.log(3), 0], [0, 0]]).view(2, 1, 1, 2)  # one token per page
    # head 0 favours page 0 (3:1), head 1 sees equal logits.
    query = torch.tensor([[[1.0, 0], [0, 0]]])
    mass = page_attention_mass(query, keys, torch.arange(2).view(2, 1), torch.tensor([1]), 1.0)
    torch.testing.assert_close(mass, torch.tensor([[(3 / 4 + 1 / 2) / 2, (1 / 4 + 1 / 2) / 2]]))


def test_accumulate_keeps_sum_squares_count_and_last_by_logical_page():
    stats = torch.zeros(NUM_STATS, 4)
    mass = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    seen = torch.tensor([[True, True, False], [True, True, True]])
    accumulate(stats, torch.tensor([3, 0, 1]), mass, seen)  # columns hold pages 3, 0, 1
    torch.testing.assert_close(stats, torch.tensor([
        [0.8, 0.5, 0.0, 0.7],
        [0.34, 0.25, 0.0, 0.29],
        [2.0, 1.0, 0.0, 2.0],
        [0.3, 0.5, 0.0, 0.2]]))


def _stats(total, squares, count, last, pinned, budget_pages=10):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return PageAttentionStats(t(total), t(squares), t(count), t(last),
                              torch.tensor(pinned), budget_pages)


STATS = _stats(total=[3.0, 1.0, 0.4, 0.9, 2.0], squares=[3.0, 0.5, 0.08, 0.81, 2.0],
               count=[3, 2, 2, 1, 2], last=[0.1, 0.6, 0.2, 0.05, 0.05],
               pinned=[True, False, False, False, True])


@pytest.mark.parametrize("name, expected", [
    ("h2o", [3.0, 1.0, 0.4, 0.9, 2.0]),  # accumulated attention
    ("tova", [0.1, 0.6, 0.2, 0.05, 0.05]),  # the last query's attention
    ("snapkv", [3.0, 1.0, 0.4, 0.9, 2.0]),  # observation-window votes
])
def test_single_statistic_rules(name, expected):
    torch.testing.assert_close(get_policy(name).score(STATS), torch.tensor(expected))


def test_roco_keeps_high_deviation_pages_out_of_scope_and_ranks_the_rest_by_mean():
    # Page 1 saw masses 0.5 and 0.5 (std 0), page 2 saw 0.0 and 0.4 (std 0.2), page 3 once.
    stats = _stats(total=[3.0, 1.0, 0.4, 0.9, 2.0], squares=[3.0, 0.5, 0.16, 0.81, 2.0],
                   count=[3, 2, 2, 1, 2], last=[0] * 5, pinned=[True, False, False, False, True])
    # int(0.3 * 10) = 3 pages out of scope: the two pinned (infinite deviation) and page 2
    # (std 0.2); inside the scope pages 1 and 3 are ranked by mean, 0.5 and 0.9.
    score = get_policy("roco").score(stats)
    assert score[[0, 2, 4]].isinf().all()
    torch.testing.assert_close(score[[1, 3]], torch.tensor([0.5, 0.9]))
    assert get_policy("roco").std_ratio == 0.3


def test_roco_with_a_small_budget_is_plain_mean_attention():
    stats = _stats(total=[1.0, 0.6, 0.4], squares=[1.0, 0.36, 0.16], count=[2, 2, 2],
                   last=[0] * 3, pinned=[False] * 3, budget_pages=3)  # int(0.9) = 0 protected
    torch.testing.assert_close(get_policy("roco").score(stats), torch.tensor([0.5, 0.3, 0.2]))
