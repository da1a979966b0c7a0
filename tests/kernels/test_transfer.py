"""Batched page copies (CPU path: synchronous) in vLLM 0.32's CPU and FlashAttention caches."""
import pytest
import torch

from tests.flash_layout import flash_layer_caches
from vllm_kvevict.kernels.transfer import PageTransfer
from vllm_kvevict.pages import CPUBlockFormat, FlashBlockFormat


def _flash_cache(layout):
    kv_cache = flash_layer_caches(2, 10, 16, 2, 8, layout=layout)[1]
    kv_cache.copy_(torch.randn(kv_cache.shape))
    return kv_cache


@pytest.mark.parametrize("block_format, make_cache", [
    (FlashBlockFormat(), lambda: _flash_cache("LBNHC")),
    (FlashBlockFormat(), lambda: _flash_cache("BLNHC")),
    (CPUBlockFormat(), lambda: torch.randn(10, 2, 16, 16)),
], ids=["flash-LBNHC", "flash-BLNHC", "cpu"])
def test_backup_then_recall_into_other_blocks(block_format, make_cache):
    torch.manual_seed(3)
    kv_cache = make_cache()
    original = kv_cache.clone()
    host = torch.zeros((6, *block_format.page_shape(kv_cache)))
    transfer = PageTransfer(block_format, num_layers=1)
    transfer.backup(0, kv_cache, torch.tensor([4, 1, 7]), host, torch.tensor([5, 0, 2]))
    transfer.recall(0, kv_cache, torch.tensor([9, 3]), host, torch.tensor([0, 2]))
    transfer.wait(0, kv_cache.device)
    read = block_format.read
    assert torch.equal(read(kv_cache, torch.tensor([9, 3])), read(original, torch.tensor([1, 7])))
    assert torch.equal(host[5], read(original, torch.tensor([4]))[0])
    untouched = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8])
    assert torch.equal(read(kv_cache, untouched), read(original, untouched))
    transfer.recall(0, kv_cache, torch.tensor([], dtype=torch.int64), host,
                    torch.tensor([], dtype=torch.int64))
