"""The compiled CPU selection keeps exactly the pages the torch rule keeps, given its scores:
pinned first, then the best-scored, the more recent page winning a tie, also when pinned pages
do not all fit or a score is infinite."""
import numba
import numpy as np
import pytest
import torch

from vllm_kvevict.algorithms.selection import keep_mask
from vllm_kvevict.kernels import cpu

KV_HEADS, GROUP, HEAD_DIM, PAGES = 2, 2, 8, 12


def _select(query, digests, host_ids, num_full, pinned, num_keep, ahead=cpu.PREFETCH_PAGES):
    """The compiled selection (no placement) of float32 or bfloat16 ``digests``."""
    rows = host_ids.shape[0]
    bits = torch.int16 if digests.dtype == torch.bfloat16 else torch.int32
    keep = np.zeros(host_ids.shape, dtype=np.bool_)
    scores = np.zeros(host_ids.shape, dtype=np.float32)
    held = np.full((rows, 1), PAGES, dtype=np.int64)
    unused = np.zeros((1, 1, 1, 1), dtype=np.int32)
    cpu.select_pages(query.view(torch.int32).numpy(), False, np.arange(rows),
                     digests.view(bits).numpy(), digests.dtype == torch.bfloat16, host_ids,
                     num_full, pinned, num_keep, held, np.zeros((rows, 1), np.bool_),
                     np.zeros((rows, 1), np.int64), np.full(rows, -1), unused, unused,
                     cpu.NO_PLACEMENT, keep, scores, ahead)
    return keep, scores


@pytest.mark.parametrize("seed", range(4))
def test_keep_matches_the_torch_rule(seed):
    generator = torch.Generator().manual_seed(seed)
    rows = 6
    query = torch.randn(rows, KV_HEADS * GROUP, HEAD_DIM, generator=generator)
    digests = torch.randn(PAGES * rows, 2, KV_HEADS, HEAD_DIM, generator=generator)
    digests[:, 0] = digests[:, 0].abs()  # hi >= 0
    digests[:, 1] = -digests[:, 1].abs()  # lo <= 0
    host_ids = np.arange(PAGES * rows, dtype=np.int64).reshape(rows, PAGES)
    num_full = np.array([12, 9, 12, 5, 12, 12], dtype=np.int64)
    pinned = np.zeros((rows, PAGES), dtype=np.bool_)
    pinned[:, :2] = True  # sinks
    for r, n in enumerate(num_full):
        pinned[r, n - 1] = True  # window
    pinned[0, [4, 7]] = True  # anchors
    num_keep = np.array([6, 5, 6, 4, 3, 2], dtype=np.int64)  # row 5: fewer than its pinned
    host_ids[1, 3:6] = host_ids[1, 3]  # equal scores: the more recent page wins
    host_ids[2, 5] = host_ids[2, 8] = host_ids[2, 9]
    # An infinite score outside the pinned pages (a channel where every query value is > 0).
    query[4, :, 0] = query[4, :, 0].abs() + 1
    digests[host_ids[4, 6], 0, :, 0] = float("inf")
    keep, scores = _select(query, digests, host_ids, num_full, pinned, num_keep)
    valid = torch.arange(PAGES) < torch.from_numpy(num_full)[:, None]
    expected = keep_mask(torch.from_numpy(scores), valid, torch.from_numpy(pinned),
                         torch.from_numpy(np.minimum(num_keep, num_full)))
    assert np.isinf(scores[4, 6]) and scores[4, 6] > 0
    assert torch.equal(torch.from_numpy(keep), expected)
    # An infinite score ties with the pinned pages: the 3 most recent of the 4 are kept.
    assert np.flatnonzero(keep[4]).tolist() == [1, 6, 11]
    assert np.flatnonzero(keep[5]).tolist() == [1, 11]  # the most recent pinned pages


def test_bfloat16_digests_score_as_their_float32_values():
    """Digests stored in bfloat16 (a bfloat16 KV cache's) score exactly as the same values in
    float32 do, and keep the same pages."""
    generator = torch.Generator().manual_seed(7)
    rows = 4
    query = torch.randn(rows, KV_HEADS * GROUP, HEAD_DIM, generator=generator)
    centre = torch.randn(PAGES * rows, 1, KV_HEADS, HEAD_DIM, generator=generator)
    radius = torch.rand(PAGES * rows, 1, KV_HEADS, HEAD_DIM, generator=generator)
    digests = torch.cat([centre + radius, centre - radius], dim=1).to(torch.bfloat16)
    host_ids = np.arange(PAGES * rows, dtype=np.int64).reshape(rows, PAGES)
    num_full = np.array([12, 7, 12, 10], dtype=np.int64)
    pinned = np.zeros((rows, PAGES), dtype=np.bool_)
    pinned[:, 0] = True
    num_keep = np.full(rows, 5, dtype=np.int64)
    keep16, scores16 = _select(query, digests, host_ids, num_full, pinned, num_keep)
    keep32, scores32 = _select(query, digests.float(), host_ids, num_full, pinned, num_keep)
    valid = np.arange(PAGES) < num_full[:, None]
    assert np.array_equal(scores16[valid], scores32[valid])
    assert np.array_equal(keep16, keep32)
    assert keep16.sum() == 5 * rows


def test_digests_are_prefetched_ahead_without_changing_the_selection():
    """``ahead`` pages of digests are prefetched (LLVM's prefetch in the compiled selection);
    the hint changes no score and no kept page."""
    generator = torch.Generator().manual_seed(3)
    rows = 5
    query = torch.randn(rows, KV_HEADS * GROUP, HEAD_DIM, generator=generator)
    digests = torch.randn(PAGES * rows, 2, KV_HEADS, HEAD_DIM, generator=generator)
    host_ids = np.random.default_rng(3).permutation(PAGES * rows).reshape(rows, PAGES)
    num_full = np.array([12, 3, 12, 1, 9], dtype=np.int64)  # rows shorter than ``ahead``
    pinned = np.zeros((rows, PAGES), dtype=np.bool_)
    num_keep = np.full(rows, 4, dtype=np.int64)
    results = {ahead: _select(query, digests, host_ids, num_full, pinned, num_keep, ahead)
               for ahead in (0, 1, cpu.PREFETCH_PAGES, 2 * PAGES)}
    for keep, scores in results.values():
        assert np.array_equal(keep, results[0][0]) and np.array_equal(scores, results[0][1])


def test_prefetch_emits_llvms_prefetch_and_never_faults():
    @numba.njit
    def touch(pages, far):
        cpu._prefetch_all(pages[1])
        cpu._prefetch(pages[0], far)  # a hint: an address outside the array does not fault
        return pages[1].sum()

    pages = np.arange(3 * 64, dtype=np.int16).reshape(3, 64)
    assert touch(pages, 1 << 40) == pages[1].sum()
    ir = "".join(touch.inspect_llvm().values())
    assert ir.count("@llvm.prefetch") >= 2  # declared and called
