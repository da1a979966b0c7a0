"""Digest kernel (Triton interpreter on CPU) against the torch reference."""
import pytest
import torch

from tests.flash_layout import random_key_value_views
from vllm_kvevict.algorithms.digest import page_digests
from vllm_kvevict.kernels.digest import build_digests


@pytest.mark.parametrize("kind", ["cuboid-mean", "cuboid-max"])
@pytest.mark.parametrize("page_size, head_dim, dtype", [(16, 64, torch.bfloat16),
                                                        (32, 48, torch.float16),
                                                        (32, 64, torch.float32)])
def test_digests_match_reference_from_the_paged_cache(kind, page_size, head_dim, dtype, device):
    torch.manual_seed(0)
    # The key view of vLLM 0.32's FlashAttention cache: strided, keys and values interleaved.
    key_cache, _ = random_key_value_views(9, page_size, 3, head_dim, dtype, device)
    block_ids = torch.tensor([8, 0, 5, 3], device=device)
    hi, lo = build_digests(key_cache, block_ids, kind)
    ref_hi, ref_lo = page_digests(key_cache[block_ids], kind)
    torch.testing.assert_close(hi, ref_hi, rtol=0, atol=1e-6)
    torch.testing.assert_close(lo, ref_lo, rtol=0, atol=1e-6)


def test_no_pages_and_bad_input(device):
    key_cache = torch.randn(4, 16, 2, 64, device=device)
    hi, lo = build_digests(key_cache, torch.tensor([], dtype=torch.int64, device=device))
    assert hi.shape == (0, 2, 64) and lo.shape == (0, 2, 64)
    with pytest.raises(ValueError, match="unknown digest kind"):
        build_digests(key_cache, torch.tensor([0]), "sphere")
    with pytest.raises(ValueError, match="power-of-two page"):
        build_digests(torch.randn(4, 12, 2, 64), torch.tensor([0]))
