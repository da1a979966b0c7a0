"""Batched scoring kernel and one-top-k selection against the per-request torch reference."""
import pytest
import torch

from vllm_kvevict.algorithms.digest import score_pages, stored_digests
from vllm_kvevict.algorithms.selection import select_pages
from vllm_kvevict.kernels.scoring import score_batch, selected_blocks, top_pages


def _ragged_batch(device, num_q_heads=8, num_kv_heads=2, head_dim=64):
    torch.manual_seed(1)
    hi = torch.randn(40, num_kv_heads, head_dim)
    lo = hi - torch.rand(40, num_kv_heads, head_dim)
    query = torch.randn(4, num_q_heads, head_dim)
    num_pages = torch.tensor([23, 5, 1, 12])
    slots = torch.stack([torch.randperm(40)[:23] for _ in range(4)])
    return tuple(t.to(device) for t in (query, hi, lo, slots, num_pages))


@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("sink, window", [(1, 2), (0, 0), (2, 4)])
def test_scores_match_reference_with_pins_and_ragged_pages(per_kv_head, sink, window, device):
    query, hi, lo, slots, num_pages = _ragged_batch(device)
    scores = score_batch(query, hi, lo, slots, num_pages, sink, window, per_kv_head,
                         block_pages=8)  # several page runs per request
    for b, n in enumerate(num_pages.tolist()):
        rows = slots[b, :n]
        ref = score_pages(query[b], hi[rows], lo[rows], per_kv_head=per_kv_head)
        got = scores[b][..., :n]
        pinned = torch.zeros(n, dtype=torch.bool, device=device)
        pinned[:sink] = True
        if window:
            pinned[max(0, n - window):] = True
        assert torch.isinf(got[..., pinned]).all() and (got[..., pinned] > 0).all()
        torch.testing.assert_close(got[..., ~pinned], ref[..., ~pinned], rtol=1e-5, atol=1e-5)
        assert (scores[b][..., n:] == float("-inf")).all()


def test_gqa_group_of_one_and_head_dim_not_a_power_of_two(device):
    query, hi, lo, slots, num_pages = _ragged_batch(device, num_q_heads=2, num_kv_heads=2,
                                                    head_dim=40)
    scores = score_batch(query, hi, lo, slots, num_pages, 0, 0)
    ref = score_pages(query[0], hi[slots[0]], lo[slots[0]])
    torch.testing.assert_close(scores[0], ref, rtol=1e-5, atol=1e-5)


def test_one_top_k_equals_per_request_selection(device):
    query, hi, lo, slots, num_pages = _ragged_batch(device)
    sink, window, top_k = 1, 2, 3
    pages, counts = top_pages(score_batch(query, hi, lo, slots, num_pages, sink, window),
                              sink + window + top_k)
    for b, n in enumerate(num_pages.tolist()):
        rows = slots[b, :n]
        expected = select_pages(score_pages(query[b], hi[rows], lo[rows]), sink, window, top_k)
        assert counts[b] == expected.numel()
        assert pages[b, :counts[b]].tolist() == expected.tolist()
        assert (pages[b, counts[b]:] == -1).all()


def test_selected_pages_to_blocks_and_token_counts():
    pages = torch.tensor([[0, 2, 3], [1, -1, -1]])
    block_table = torch.tensor([[7, 4, 9, 2], [5, 6, 0, 0]])
    blocks, tokens = selected_blocks(pages, block_table, torch.tensor([100, 40]), 32)
    assert blocks[0].tolist() == [7, 9, 2] and blocks[1, 0] == 6
    assert tokens.tolist() == [[32, 32, 4], [8, 0, 0]]  # last pages: 100-96 and 40-32 tokens


def test_digests_as_views_of_one_tensor(device):
    """The page runtime stores digests as ``[slots, 2, kv_heads, head_dim]``: hi and lo are
    strided views, read in place."""
    query, hi, lo, slots, num_pages = _ragged_batch(device)
    digests = torch.stack([hi, lo], dim=1)
    scores = score_batch(query, digests[:, 0], digests[:, 1], slots, num_pages, 0, 0)
    torch.testing.assert_close(scores, score_batch(query, hi, lo, slots, num_pages, 0, 0))


def test_bfloat16_digests_score_as_their_float32_values(device):
    """Digests stored in a bfloat16 cache's type (:func:`stored_digests`) are read as bfloat16
    and scored in float32: as the same values given in float32."""
    query, hi, lo, slots, num_pages = _ragged_batch(device)
    digests = stored_digests(hi, lo, torch.bfloat16)
    scores = score_batch(query, digests[:, 0], digests[:, 1], slots, num_pages, 0, 0, True)
    widened = digests.float()
    expected = score_batch(query, widened[:, 0], widened[:, 1], slots, num_pages, 0, 0, True)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)
