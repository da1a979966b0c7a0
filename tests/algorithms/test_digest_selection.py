"""Digests, digest scores and page selection on hand-computed cases."""
import pytest
import torch

from vllm_kvevict.algorithms.digest import (digest_dtype, page_digests, score_packed_pages,
                                            score_pages, stored_digests)
from vllm_kvevict.algorithms.selection import select_pages


def test_cuboid_mean_and_max_digests():
    # One page of 3 tokens, one KV head, 2 dims.
    keys = torch.tensor([[[[0.0, 4.0]], [[2.0, -2.0]], [[4.0, 1.0]]]])
    hi, lo = page_digests(keys, "cuboid-max")
    assert hi.tolist() == [[[4.0, 4.0]]] and lo.tolist() == [[[0.0, -2.0]]]
    hi, lo = page_digests(keys, "cuboid-mean")
    # centre (2, 1); mean |k - c| = (2+0+2)/3, (3+3+0)/3 = 4/3, 2
    torch.testing.assert_close(hi, torch.tensor([[[2 + 4 / 3, 3.0]]]))
    torch.testing.assert_close(lo, torch.tensor([[[2 - 4 / 3, -1.0]]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_digests_round_outward_to_the_nearest_values(dtype):
    """A stored ``hi`` is the least value of the type not below the computed one, a stored
    ``lo`` the greatest not above it: the box only grows, by at most one step per side."""
    torch.manual_seed(3)
    hi = torch.randn(64, 3, 8) * 4
    lo = hi - torch.rand(64, 3, 8)
    hi[0, 0, :2] = torch.tensor([0.5, -2.0])  # exact in the type: kept as they are
    stored = stored_digests(hi, lo, dtype)
    assert stored.dtype == dtype and stored.shape == (64, 2, 3, 8)
    up, down = stored[:, 0], stored[:, 1]
    inf = torch.full_like(up, float("inf"))
    assert (up.float() >= hi).all() and (torch.nextafter(up, -inf).float() < hi).all()
    assert (down.float() <= lo).all() and (torch.nextafter(down, inf).float() > lo).all()
    assert up[0, 0, :2].tolist() == [0.5, -2.0]
    assert (up.float() != hi).any()  # some values needed rounding
    assert digest_dtype(dtype) == dtype and digest_dtype(torch.float32) == torch.float32
    assert torch.equal(stored_digests(hi, lo, torch.float32), torch.stack([hi, lo], dim=1))


def test_unknown_digest_kind():
    with pytest.raises(ValueError, match="unknown digest kind"):
        page_digests(torch.zeros(1, 2, 1, 2), "sphere")


def test_score_is_box_upper_bound_and_exact_for_cuboid_max():
    torch.manual_seed(0)
    keys = torch.randn(5, 8, 2, 4)
    query = torch.randn(4, 4)  # 4 query heads over 2 KV heads
    hi, lo = page_digests(keys, "cuboid-max")
    scores = score_pages(query, hi, lo, per_kv_head=True)
    assert scores.shape == (2, 5)
    q = query.view(2, 2, 4)
    for kv in range(2):
        for page in range(5):
            dots = torch.einsum("gd,td->gt", q[kv], keys[page, :, kv])
            assert torch.all(scores[kv, page] >= dots.max(dim=1).values.mean() - 1e-5)


def test_score_hand_case_and_head_mean():
    hi = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])     # 2 pages, 1 KV head
    lo = torch.tensor([[[-1.0, 0.0]], [[-3.0, -1.0]]])
    query = torch.tensor([[1.0, -1.0], [-2.0, 0.0]])     # 2 query heads
    # head 0: page0 max(1,-1)+max(-2,0)=1 ; page1 max(0,-3)+max(0,1)=1
    # head 1: page0 max(-2,2)+0=2 ; page1 max(0,6)+0=6
    torch.testing.assert_close(score_pages(query, hi, lo), torch.tensor([1.5, 3.5]))


def test_select_pins_sinks_and_window_then_best_scores():
    scores = torch.tensor([0.0, 0.0, 9.0, 1.0, 8.0, 2.0, 0.0, 0.0])
    kept = select_pages(scores, sink_pages=2, window_pages=2, top_k=2)
    assert kept.tolist() == [0, 1, 2, 4, 6, 7]


def test_select_short_request_keeps_everything_and_ties_prefer_recent():
    assert select_pages(torch.zeros(3), 2, 2, 4).tolist() == [0, 1, 2]
    kept = select_pages(torch.zeros(6), sink_pages=1, window_pages=1, top_k=2)
    assert kept.tolist() == [0, 3, 4, 5]


def test_packed_scores_equal_score_pages_for_a_batch():
    torch.manual_seed(4)
    query = torch.randn(5, 6, 16).to(torch.bfloat16)
    hi = torch.randn(5, 7, 2, 16)
    lo = hi - torch.rand(5, 7, 2, 16)
    packed = score_packed_pages(query, torch.stack([hi, lo], dim=2))
    torch.testing.assert_close(packed, score_pages(query, hi, lo), rtol=1e-5, atol=1e-5)
