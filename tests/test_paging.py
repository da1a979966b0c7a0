"""PageLayout: which pages are evicted, and the block-table compaction the backend applies."""
import pytest
import torch

from vllm_kvevict.config import EvictionConfigError
from vllm_kvevict.paging import PageLayout

# 4-token pages, budget 4 pages (2 sinks), so 2 recent full pages stay.
LAYOUT = PageLayout(block_size=4, budget_pages=4, sink_pages=2, window_pages=1)


def test_from_tokens_rounds_budget_down_and_sinks_window_up():
    layout = PageLayout.from_tokens(32, budget=300, sink_tokens=4, window_tokens=33)
    assert (layout.budget_pages, layout.sink_pages, layout.window_pages) == (9, 1, 2)


def test_budget_smaller_than_sinks_plus_window_in_pages_is_refused():
    # 100 tokens >= 64 + 32 in tokens, but only 3 pages of 32 < 2 + 2 pages.
    with pytest.raises(EvictionConfigError, match="fewer than 2 sink \\+ 2 window blocks"):
        PageLayout.from_tokens(32, budget=100, sink_tokens=33, window_tokens=33)


@pytest.mark.parametrize("num_computed, expected", [
    (0, range(2, 2)),
    (16, range(2, 2)),    # 4 full pages: exactly the budget
    (19, range(2, 2)),
    (20, range(2, 3)),    # 5 full pages: page 2 leaves
    (23, range(2, 3)),
    (40, range(2, 8)),    # 10 full pages: sinks 0-1, recent 8-9
])
def test_evicted_pages_after_prompt(num_computed, expected):
    assert LAYOUT.evicted_pages(num_computed, prefilling=False) == expected


def test_nothing_is_evicted_while_prefilling():
    assert len(LAYOUT.evicted_pages(4000, prefilling=True)) == 0


def test_resident_pages_never_exceed_budget_plus_filling_page():
    for num_computed in range(0, 200):
        num_pages = num_computed // 4 + 1  # full pages + the page the next token goes to
        resident = num_pages - len(LAYOUT.evicted_pages(num_computed, prefilling=False))
        assert resident <= LAYOUT.max_resident_pages


def test_evicted_range_only_grows():
    previous = range(2, 2)
    for num_computed in range(0, 200):
        current = LAYOUT.evicted_pages(num_computed, prefilling=False)
        assert current.start == previous.start and current.stop >= previous.stop
        previous = current


def test_compact_block_table_exact_ids():
    # Row 0: decoding with 41 tokens (40 computed + 1 new) -> pages 0,1 + 8,9 + 10.
    # Row 1: still prefilling -> untouched.  Row 2: short decode, nothing evicted.
    table = torch.tensor([
        [100 + i for i in range(12)],
        [200 + i for i in range(12)],
        [300 + i for i in range(12)],
    ], dtype=torch.int32)
    seq_lens = torch.tensor([41, 30, 9], dtype=torch.int32)
    query_lens = torch.tensor([1, 10, 1], dtype=torch.int32)
    prefilling = torch.tensor([False, True, False])
    compact, new_lens = LAYOUT.compact_block_table(table, seq_lens, query_lens, prefilling)
    assert compact.dtype == table.dtype
    assert new_lens.tolist() == [41 - 6 * 4, 30, 9]
    assert compact[0, :5].tolist() == [100, 101, 108, 109, 110]
    assert compact[1, :8].tolist() == [200 + i for i in range(8)]
    assert compact[2, :3].tolist() == [300, 301, 302]


def test_compaction_matches_evicted_pages_for_every_length():
    table = torch.arange(64, dtype=torch.int32).unsqueeze(0)
    for seq_len in range(1, 200):
        compact, new_len = LAYOUT.compact_block_table(
            table, torch.tensor([seq_len]), torch.tensor([1]), torch.tensor([False]))
        evicted = LAYOUT.evicted_pages(seq_len - 1, prefilling=False)
        num_pages = -(-seq_len // 4)
        expected = [p for p in range(num_pages) if p not in evicted]
        assert int(new_len) == seq_len - 4 * len(evicted)
        assert compact[0, :len(expected)].tolist() == expected
