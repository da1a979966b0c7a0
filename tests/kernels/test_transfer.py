"""Masked page copies (kernel) against the torch reference, in vLLM 0.32's FlashAttention layouts:
cache -> host store (backup), host store -> cache (recall), cache -> cache (a prompt's end)."""
import pytest
import torch

from tests.flash_layout import flash_layer_caches
from vllm_kvevict.kernels.transfer import copy_pages, copy_pages_reference

NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM = 10, 16, 2, 8


def _cache(layout, dtype, device):
    kv_cache = flash_layer_caches(2, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM, dtype=dtype,
                                  layout=layout, device=device)[1]
    kv_cache.copy_(torch.randn(kv_cache.shape).to(dtype))
    return kv_cache


def _host(dtype):
    return torch.randn(6, HEADS, BLOCK, 2 * HEAD_DIM).to(dtype)


@pytest.mark.parametrize("layout", ["LBNHC", "BLNHC", "LBHNC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["backup", "recall", "within"])
def test_masked_copies_match_reference(layout, dtype, direction, device):
    torch.manual_seed(3)
    cache, host = _cache(layout, dtype, device), _host(dtype).to(device)
    src, dst = {"backup": (cache, host), "recall": (host, cache),
                "within": (cache, cache)}[direction]
    # [rows, width] pairs as the runtime pads them; masked pairs point anywhere.
    src_ids = torch.tensor([[4, 1, 2], [5, 0, 3]], device=device)
    dst_ids = torch.tensor([[0, 2, 5], [1, 3, 4]], device=device)
    if direction == "within":  # destinations disjoint from the sources
        dst_ids = torch.tensor([[6, 8, 9], [7, 9, 9]], device=device)
    valid = torch.tensor([[True, True, False], [True, False, False]], device=device)
    expected_dst = dst.clone()
    copy_pages_reference(src.clone(), src_ids, expected_dst, dst_ids, valid)
    source_before = src.clone()
    copy_pages(src, src_ids, dst, dst_ids, valid, device)
    assert torch.equal(dst, expected_dst)
    if direction != "within":
        assert torch.equal(src, source_before)
    assert not torch.equal(dst, dst.new_zeros(dst.shape))


def test_nothing_valid_copies_nothing(device):
    cache, host = _cache("LBNHC", torch.float32, device), _host(torch.float32).to(device)
    before = cache.clone()
    ids = torch.zeros((2, 3), dtype=torch.int64, device=device)
    copy_pages(host, ids, cache, ids, torch.zeros((2, 3), dtype=torch.bool, device=device),
               device)
    assert torch.equal(cache, before)


def test_mismatched_pages_are_refused():
    with pytest.raises(ValueError, match="pages differ"):
        copy_pages(_host(torch.float32), torch.zeros(1, dtype=torch.int64),
                   _cache("LBNHC", torch.bfloat16, "cpu"), torch.zeros(1, dtype=torch.int64),
                   torch.ones(1, dtype=torch.bool), torch.device("cpu"))
