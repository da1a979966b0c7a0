"""``--prefix-cache-eviction-policy marconi``: vLLM 0.32's block pool choosing by Marconi.

Installed only under ``marconi`` (``lru`` installs nothing): ``cli.py`` points
``scheduler_cls`` at :class:`MarconiScheduler` (or :class:`MarconiAsyncScheduler`), whose
``__init__`` has vLLM's KV-cache coordinator build a :class:`MarconiBlockPool` instead of a
``BlockPool``. Everything else of vLLM's prefix cache stays: hashing, lookup, ``touch``,
``free_blocks``' order, events. Only *which* free block ``get_new_blocks`` takes changes:

* the pool's ``free_block_queue`` is a :class:`MarconiFreeQueue`: free blocks without a hash
  stay in vLLM's own ``FreeKVCacheBlockQueue`` (taken first, in vLLM's order); free cached
  blocks live in a :class:`~vllm_kvevict.prefix_cache.marconi.MarconiIndex`, which gives up the
  lowest-utility leaf once the plain ones are used up;
* ``cache_full_blocks`` tells the index each new cached block's parent (the request's previous
  block hash); ``_remove_cached_block_hashes`` tells it a key is gone (a free block whose key is
  dropped, e.g. by a KV connector, becomes plain);
* the scheduler's ``add_request`` shows each arriving request to the pool's alpha tuner.
"""
from __future__ import annotations

import contextlib
import functools

from vllm.logger import init_logger
from vllm.v1.core import kv_cache_coordinator
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import (FreeKVCacheBlockQueue, KVCacheBlock,
                                         make_block_hash_with_group_id, resolve_block_hashes)
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvevict.prefix_cache.config import PrefixCacheConfig
from vllm_kvevict.prefix_cache.marconi import BlockCost, MarconiIndex
from vllm_kvevict.prefix_cache.tuning import AlphaTuner

logger = init_logger("vllm.kvevict")


class MarconiFreeQueue:
    """Stands in for ``BlockPool.free_block_queue`` (the methods the pool calls).

    Invariant: every free block is in exactly one of ``plain`` (no hash) and ``index`` (cached);
    ``num_free_blocks`` counts both.
    """

    def __init__(self, all_blocks: list[KVCacheBlock], free: list[KVCacheBlock],
                 index: MarconiIndex):
        self.plain = FreeKVCacheBlockQueue(free)
        self.index = index
        self.blocks = all_blocks  # indexed by block id

    @property
    def num_free_blocks(self) -> int:
        return self.plain.num_free_blocks + self.index.num_free

    def popleft(self) -> KVCacheBlock:
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        taken = self.plain.popleft_n(min(n, self.plain.num_free_blocks))
        for _ in range(n - len(taken)):
            victim = self.index.pop_victim()
            if victim is None:
                raise ValueError("No free blocks available")
            taken.append(self.blocks[victim])
        return taken

    def remove(self, block: KVCacheBlock) -> None:
        if self.index.is_free(block.block_id):
            self.index.touch(block.block_id)
        else:
            self.plain.remove(block)

    def append(self, block: KVCacheBlock) -> None:
        self.append_n([block])

    def append_n(self, blocks: list[KVCacheBlock]) -> None:
        self.plain.append_n(self._free_cached(blocks))

    def prepend_n(self, blocks: list[KVCacheBlock]) -> None:
        self.plain.prepend_n(self._free_cached(blocks))

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        cached = sorted(self.index.free_blocks(), key=self.index.free_stamp)
        return self.plain.get_all_free_blocks() + [self.blocks[b] for b in cached]

    def _free_cached(self, blocks: list[KVCacheBlock]) -> list[KVCacheBlock]:
        """Hand the cached ones to the index (in order: later = more recent); return the rest."""
        plain = []
        for block in blocks:
            if self.index.is_cached(block.block_id):
                self.index.free(block.block_id)
            else:
                plain.append(block)
        return plain


class MarconiBlockPool(BlockPool):
    """vLLM's ``BlockPool`` with :class:`MarconiFreeQueue` (see the module docstring)."""

    def __init__(self, *args, cost: BlockCost, settings: PrefixCacheConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.cost = cost
        alpha = settings.alpha if settings.alpha is not None else 0.0
        self.index = MarconiIndex(cost.efficiency, alpha)
        # Re-home the free blocks: the null block (popped by BlockPool) stays out.
        queue = MarconiFreeQueue(self.blocks, self.blocks[1:], self.index)
        self.free_block_queue = queue
        self.tuner = None if settings.alpha is not None else AlphaTuner(
            capacity=self.num_gpu_blocks - 1, block_size=self.hash_block_size,
            efficiency=cost.efficiency, flops=cost.flops, window=settings.tune_window,
            alpha=alpha)
        self._parents: dict[int, object] = {}

    def cache_full_blocks(self, request, blocks, num_cached_blocks, num_full_blocks,
                          block_size, kv_cache_group_id, block_mask=None) -> None:
        if num_cached_blocks >= num_full_blocks:
            return
        hashes = resolve_block_hashes(request.block_hashes, self.hash_block_size, block_size)
        for i in range(max(1, num_cached_blocks), num_full_blocks):
            self._parents[blocks[i].block_id] = make_block_hash_with_group_id(
                hashes[i - 1], kv_cache_group_id)
        try:
            super().cache_full_blocks(request, blocks, num_cached_blocks, num_full_blocks,
                                      block_size, kv_cache_group_id, block_mask)
        finally:
            self._parents.clear()

    def note_request(self, request) -> None:
        """A request arrived: its (growing) hash chain joins the tuning window."""
        if self.tuner is not None and self.tuner.record(request.request_id,
                                                        request.block_hashes):
            self._tune()

    def _insert_block_hash(self, block_hash_with_group_id, block, num_tokens) -> None:
        super()._insert_block_hash(block_hash_with_group_id, block, num_tokens)
        if block.block_hash == block_hash_with_group_id:  # the primary key (not a partial one)
            tokens = block.block_hash_num_tokens or num_tokens or self.hash_block_size
            self.index.cache(block.block_id, block_hash_with_group_id,
                             self._parents.get(block.block_id), tokens)

    def _remove_cached_block_hashes(self, block: KVCacheBlock):
        removed = super()._remove_cached_block_hashes(block)
        if self.index.uncache(block.block_id):
            self.free_block_queue.plain.append(block)  # still free, now without a hash
        return removed

    def move_block_hashes(self, src_block: KVCacheBlock, dst_block: KVCacheBlock) -> None:
        parent = self.index.parent_of(src_block.block_id)
        if parent is not None:
            self._parents[dst_block.block_id] = parent
        try:
            super().move_block_hashes(src_block, dst_block)
        finally:
            self._parents.clear()

    def reset_prefix_cache(self) -> bool:
        if not super().reset_prefix_cache():
            return False
        freed = self.index.clear()
        self.free_block_queue.plain.append_n([self.blocks[b] for b in freed])
        return True

    def _tune(self) -> None:
        before = self.tuner.alpha
        self.index.alpha = self.tuner.tune()
        logger.info("vllm-kvevict: marconi alpha %.2f -> %.2f (replayed the last %d requests "
                    "over %d alphas in %.0f ms)", before, self.index.alpha, self.tuner.window,
                    len(self.tuner.grid), 1000 * self.tuner.last_tune_s)


def block_cost(vllm_config, kv_cache_config, block_size: int) -> BlockCost:
    """FLOPs and bytes of one block of this engine's pool (all its layers)."""
    bytes_per_block = sum(group.kv_cache_spec.page_size_bytes * len(group.layer_names)
                          for group in kv_cache_config.kv_cache_groups)
    return BlockCost.from_hf_config(vllm_config.model_config.hf_text_config, block_size,
                                    bytes_per_block)


@contextlib.contextmanager
def _marconi_pool(vllm_config, kv_cache_config, block_size: int):
    """While the scheduler builds its KV-cache manager, the coordinator builds our pool."""
    settings = PrefixCacheConfig.from_additional_config(vllm_config.additional_config)
    factory = functools.partial(MarconiBlockPool, settings=settings,
                                cost=block_cost(vllm_config, kv_cache_config, block_size))
    original = kv_cache_coordinator.BlockPool
    kv_cache_coordinator.BlockPool = factory
    try:
        yield
    finally:
        kv_cache_coordinator.BlockPool = original
    how = (f"alpha {settings.alpha:g} (fixed)" if settings.alpha is not None
           else f"alpha tuned online every {settings.tune_window} requests")
    logger.info("vllm-kvevict: prefix cache gives up blocks by marconi, %s", how)


class _MarconiSchedulerMixin:
    """Builds the KV-cache manager over a :class:`MarconiBlockPool`; shows it each request."""

    def __init__(self, vllm_config, kv_cache_config, structured_output_manager, block_size,
                 *args, **kwargs):
        with _marconi_pool(vllm_config, kv_cache_config, block_size):
            super().__init__(vllm_config, kv_cache_config, structured_output_manager,
                             block_size, *args, **kwargs)

    def add_request(self, request) -> None:
        super().add_request(request)
        self.kv_cache_manager.block_pool.note_request(request)


class MarconiScheduler(_MarconiSchedulerMixin, Scheduler):
    """vLLM's scheduler over a :class:`MarconiBlockPool`."""


class MarconiAsyncScheduler(_MarconiSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler over a :class:`MarconiBlockPool`."""


def scheduler_qualname(async_scheduling: bool) -> str:
    cls = MarconiAsyncScheduler if async_scheduling else MarconiScheduler
    return f"{cls.__module__}.{cls.__qualname__}"
