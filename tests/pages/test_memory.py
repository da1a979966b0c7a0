"""Host tensors on transparent huge pages (:mod:`vllm_kvevict.pages.memory`)."""
import sys

import pytest
import torch

from vllm_kvevict.pages import CPUBlockFormat, HostPageStore
from vllm_kvevict.pages.memory import HUGE_PAGE_BYTES, huge_page_empty

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping of this process that holds ``address``."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux_only
def test_large_tensors_start_on_a_huge_page_advised_as_huge():
    tensor = huge_page_empty((3, 1000, 2, 512), torch.bfloat16)  # ~5.9 MiB
    assert tensor.shape == (3, 1000, 2, 512) and tensor.dtype == torch.bfloat16
    assert tensor.is_contiguous()
    assert tensor.data_ptr() % HUGE_PAGE_BYTES == 0
    tensor.fill_(1.5)
    assert tensor.float().sum().item() == 1.5 * tensor.numel()
    assert "hg" in _vm_flags(tensor.data_ptr())  # MADV_HUGEPAGE applied


def test_small_tensors_are_plain():
    tensor = huge_page_empty((4, 8), torch.float32)
    assert tensor.shape == (4, 8) and tensor.dtype == torch.float32
    assert tensor.untyped_storage().nbytes() == 4 * 8 * 4


@linux_only
def test_cpu_digests_live_on_huge_pages():
    """The digests, read cold by every layer's selection, are advised as huge; host pages are
    not (faulting them in as huge pages costs more in backups than it saves in recalls)."""
    store = HostPageStore(num_pages=8192, num_layers=2)
    store.bind(torch.zeros(4, 3, 32, 128, dtype=torch.bfloat16), CPUBlockFormat(), 3, 64)
    for digests in store.digests:
        assert digests.shape == (8192, 2, 3, 64) and digests.dtype == torch.bfloat16
        assert digests.data_ptr() % HUGE_PAGE_BYTES == 0
        assert "hg" in _vm_flags(digests.data_ptr())
