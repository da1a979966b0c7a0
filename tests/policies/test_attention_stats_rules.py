"""Attention statistics and the scoring rules of h2o, tova, roco, snapkv, lra and lfa on
hand-computed cases."""
import math

import pytest
import torch

from vllm_kvevict.algorithms.attention_stats import (NUM_STATS, PageAttentionStats, accumulate,
                                                     attended, page_attention_mass)
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


def test_accumulate_keeps_sums_attendances_last_and_latest_use_by_logical_page():
    stats = torch.zeros(NUM_STATS, 4)
    # Pages of 2 tokens; columns hold pages 3, 0, 1, 2; queries at positions 3 and 7.
    key_positions = torch.tensor([[6, 7], [0, 1], [2, 3], [4, 5]])
    mass = torch.tensor([[0.0, 0.3, 0.7, 0.0], [0.5, 0.2, 0.2, 0.1]])
    accumulate(stats, torch.tensor([3, 0, 1, 2]), mass, key_positions, torch.tensor([3, 7]))
    # Position 3 sees 4 tokens (pages 0, 1): even share 1/2, page 1 attended. Position 7 sees
    # all 8: even share 1/4, page 3 attended. Latest use: the position of the last query that
    # attended the page, else the page's first position (page 0: 0; page 2: 4).
    torch.testing.assert_close(stats, torch.tensor([
        [0.5, 0.9, 0.1, 0.5],  # total
        [0.13, 0.53, 0.01, 0.25],  # squares
        [2.0, 2.0, 1.0, 1.0],  # count (position 3 does not see pages 2 and 3)
        [0.0, 1.0, 0.0, 1.0],  # attended
        [0.2, 0.2, 0.1, 0.5],  # last
        [0.0, 3.0, 4.0, 7.0]]))  # latest use


def test_attended_means_above_the_even_share_of_the_seen_tokens():
    # Four pages; the query sees 2 + 2 + 2 + 1 = 7 tokens: even shares 2/7, 2/7, 2/7, 1/7.
    seen = torch.tensor([2, 2, 2, 1])
    mass = torch.tensor([0.30, 2 / 7, 0.27, 0.15])
    assert attended(mass, seen).tolist() == [True, False, False, True]
    # Exactly even attention, for any rounding: nothing is attended.
    even = torch.full((5,), 0.2) * (1 + 1e-6)
    assert not attended(even, torch.ones(5, dtype=torch.long)).any()


def _stats(total, squares, count, last, pinned, budget_pages=10, attended=None,
           last_attended=None):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    zeros = [0.0] * len(total)
    return PageAttentionStats(t(total), t(squares), t(count), t(attended or zeros), t(last),
                              t(last_attended or zeros), torch.tensor(pinned), budget_pages)


STATS = _stats(total=[3.0, 1.0, 0.4, 0.9, 2.0], squares=[3.0, 0.5, 0.08, 0.81, 2.0],
               count=[3, 2, 2, 1, 2], last=[0.1, 0.6, 0.2, 0.05, 0.05],
               attended=[3, 0, 2, 1, 1], last_attended=[130, 32, 96, 140, 150],
               pinned=[True, False, False, False, True])


@pytest.mark.parametrize("name, expected", [
    ("h2o", [3.0, 1.0, 0.4, 0.9, 2.0]),  # accumulated attention
    ("tova", [0.1, 0.6, 0.2, 0.05, 0.05]),  # the last query's attention
    ("snapkv", [3.0, 1.0, 0.4, 0.9, 2.0]),  # observation-window votes
    ("lra", [130.0, 32.0, 96.0, 140.0, 150.0]),  # latest use
    ("lfa", [3.0, 0.0, 2.0, 1.0, 1.0]),  # attendances
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
