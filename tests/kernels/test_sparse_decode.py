"""Sparse paged decode kernel against dense attention over the selected pages."""
import pytest
import torch

from tests.flash_layout import random_key_value_views
from vllm_kvevict.kernels.reference import sparse_decode_reference
from vllm_kvevict.kernels.sparse_decode import sparse_paged_decode


def _cache(page_size, num_kv_heads, head_dim, dtype, device, num_blocks=12):
    torch.manual_seed(2)
    # The key and value views of vLLM 0.32's FlashAttention cache (strided, K/V interleaved).
    return random_key_value_views(num_blocks, page_size, num_kv_heads, head_dim, dtype, device)


@pytest.mark.parametrize("page_size, num_q_heads, num_kv_heads, head_dim, dtype, tol", [
    (16, 6, 2, 64, torch.float32, 1e-5),    # GQA group of 3 (padded to a tile)
    (32, 4, 4, 64, torch.float32, 1e-5),    # no grouping
    (16, 8, 1, 32, torch.bfloat16, 1e-2),   # one KV head, bf16 cache
    (32, 4, 2, 128, torch.float16, 2e-3),
])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_dense_attention_over_the_selection(page_size, num_q_heads, num_kv_heads,
                                                    head_dim, dtype, tol, num_splits, device):
    key_cache, value_cache = _cache(page_size, num_kv_heads, head_dim, dtype, device)
    query = torch.randn(3, num_q_heads, head_dim).to(device, dtype)
    # Ragged selections: a sink page, a partial last page, and a request with nothing selected.
    blocks = torch.tensor([[0, 5, 9, 3], [11, 2, 0, 0], [0, 0, 0, 0]], dtype=torch.int32,
                          device=device)
    tokens = torch.tensor([[page_size, page_size, page_size, 7], [page_size, 1, 0, 0],
                           [0, 0, 0, 0]], dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    if device.type == "cuda" and dtype == torch.float32:
        tol = 2e-3  # compiled fp32 dots run in tf32
    out = sparse_paged_decode(query, key_cache, value_cache, blocks, tokens, scale, num_splits)
    ref = sparse_decode_reference(query, key_cache, value_cache, blocks, tokens, scale)
    assert out.dtype == query.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert (out[2] == 0).all()


def test_all_pages_selected_is_dense_attention(device):
    key_cache, value_cache = _cache(16, 2, 64, torch.float32, device, num_blocks=5)
    query = torch.randn(1, 4, 64, device=device)
    blocks = torch.arange(5, dtype=torch.int32, device=device)[None]
    tokens = torch.full((1, 5), 16, dtype=torch.int32, device=device)
    out = sparse_paged_decode(query, key_cache, value_cache, blocks, tokens, 0.125)
    k = key_cache.reshape(80, 2, 64).repeat_interleave(2, dim=1).transpose(0, 1)
    v = value_cache.reshape(80, 2, 64).repeat_interleave(2, dim=1).transpose(0, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(query[0, :, None], k, v,
                                                             scale=0.125)[:, 0]
    tol = 2e-3 if device.type == "cuda" else 1e-5  # compiled fp32 dots run in tf32
    torch.testing.assert_close(out[0], dense, rtol=tol, atol=tol)


def test_refuses_pages_that_are_not_tensor_core_tiles():
    key_cache, value_cache = _cache(8, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="page size 8"):
        sparse_paged_decode(torch.randn(1, 2, 64), key_cache, value_cache,
                            torch.zeros(1, 1, dtype=torch.int32),
                            torch.ones(1, 1, dtype=torch.int32), 0.1)
