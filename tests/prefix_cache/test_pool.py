"""MarconiBlockPool on hand-built vLLM pools of a few blocks: exact block ids handed out."""
import types

import pytest

from vllm_kvevict.prefix_cache.config import PrefixCacheConfig
from vllm_kvevict.prefix_cache.marconi import BlockCost

pytest.importorskip("vllm")
from vllm.v1.core.block_pool import BlockPool  # noqa: E402

from vllm_kvevict.engine.prefix_cache import MarconiBlockPool  # noqa: E402

BLOCK = 16
COST = BlockCost(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, block_size=BLOCK, bytes_per_block=4096)


def make_pool(policy: str, num_blocks: int = 11, alpha: float | None = 0.0):
    if policy == "lru":
        return BlockPool(num_blocks, enable_caching=True, hash_block_size=BLOCK)
    return MarconiBlockPool(num_blocks, enable_caching=True, hash_block_size=BLOCK, cost=COST,
                            settings=PrefixCacheConfig("marconi", alpha=alpha))


def run_request(pool, name: str, hashes: list[bytes], num_hit: int = 0):
    """A request over ``hashes``: hits its first ``num_hit`` cached blocks, allocates the rest,
    caches them all and finishes (frees tail first, as vLLM does). Returns the new block ids."""
    request = types.SimpleNamespace(request_id=name, block_hashes=hashes)
    hit = [pool.get_cached_block(h, [0])[0] for h in hashes[:num_hit]]
    pool.touch(hit)
    new = pool.get_new_blocks(len(hashes) - num_hit)
    blocks = hit + new
    pool.cache_full_blocks(request, blocks, num_hit, len(hashes), BLOCK, 0)
    pool.free_blocks(reversed(blocks))
    return [b.block_id for b in new]


def chain(name: str, n: int) -> list[bytes]:
    return [f"{name}{i}".encode() for i in range(n)]


def cached_ids(pool) -> set[int]:
    return {b.block_id for b in pool.blocks if b.block_hash is not None}


def test_single_chains_match_stock_lru_at_alpha_zero():
    """Chains that never share blocks: leaves-only LRU at alpha 0 is vLLM's LRU order."""
    handed = {}
    for policy in ("lru", "marconi"):
        pool = make_pool(policy)
        ids = [run_request(pool, f"r{i}", chain(f"c{i}", 3)) for i in range(6)]
        handed[policy] = (ids, cached_ids(pool), pool.get_num_free_blocks())
    assert handed["lru"] == handed["marconi"]


def test_marconi_keeps_the_deep_document_lru_gives_up():
    """10 usable blocks: a 6-block document, then two 3-block one-offs. LRU gives up the
    document's tail (oldest); marconi at alpha 2 the first one-off's tail (shallow)."""
    document = chain("doc", 6)
    kept = {}
    for policy in ("lru", "marconi"):
        pool = make_pool(policy, alpha=2.0)
        run_request(pool, "doc", document)
        run_request(pool, "once0", chain("a", 3))
        run_request(pool, "once1", chain("b", 3))
        hits = 0
        while hits < len(document) and pool.get_cached_block(document[hits], [0]):
            hits += 1
        kept[policy] = hits
    assert kept == {"lru": 4, "marconi": 6}


def test_free_count_and_touch_of_a_free_cached_block():
    pool = make_pool("marconi")
    run_request(pool, "a", chain("a", 4))
    assert pool.get_num_free_blocks() == 10
    run_request(pool, "a2", chain("a", 4) + chain("x", 1), num_hit=4)
    index = pool.index
    assert index.candidates() == {pool.get_cached_block(b"x0", [0])[0].block_id}
    index.check()
    new = pool.get_new_blocks(10)  # everything: plain ones first, then the chain from its tail
    assert len({b.block_id for b in new}) == 10 and pool.get_num_free_blocks() == 0
    assert cached_ids(pool) == set()


def test_reset_prefix_cache_turns_cached_free_blocks_plain():
    pool = make_pool("marconi")
    run_request(pool, "a", chain("a", 4))
    assert pool.reset_prefix_cache()
    assert pool.index.num_free == 0 and pool.get_num_free_blocks() == 10
    assert pool.get_cached_block(b"a0", [0]) is None
