"""Scheduler-side block manager that enforces the per-request budget.

NOTE: the worker's block table is append-only, so freed positions keep stale block ids there.
This manager frees exactly the logical pages :meth:`PageLayout.evicted_pages` names and the
attention backend skips exactly those pages (:meth:`PageLayout.compact_block_table`); both use
the same inputs, so the worker never reads a block that went back to the pool.
"""
from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_kvevict.config import EvictionConfigError
from vllm_kvevict.paging import cdiv

logger = init_logger("vllm.kvevict")


class EvictingAttentionManager(FullAttentionManager):
    """Frees a request's middle pages once its prompt is processed.

    Invariant: after ``remove_skipped_blocks`` with the prompt processed, a request holds at most
    ``budget_pages`` full blocks plus the block(s) being filled; the others are ``null_block``.

    Under a recalling policy (``spec.host_pages > 0``) every page is also backed up in the
    workers' host store, which holds ``host_pages`` pages. The manager reserves a request's
    pages there as it allocates (``cdiv(tokens, block_size)``, never less than the workers use)
    and refuses an allocation that would overflow the store, which the scheduler treats like a
    full KV cache: a waiting request keeps waiting, a running one preempts the lowest-priority
    request (whose host pages are released when the workers hear of it, before they run the next
    step). Invariant: the sum of reservations never exceeds ``host_pages``.

    Counted: ``host_full_refusals``, every refusal; ``host_store_refusals`` (the metrics),
    ``waited`` once per waiting request kept out (until it is admitted) and ``preempted`` once
    per refusal of a running request (each costs one preemption); ``host_reserved_peak``.
    """

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.layout = kv_cache_spec.layout
        self.host_pages = kv_cache_spec.host_pages
        self.host_reserved: dict[str, int] = {}
        self.host_reserved_total = 0
        self.host_store_refusals = {"waited": 0, "preempted": 0}
        self._kept_waiting: set[str] = set()
        self.host_reserved_peak = 0  # high-water mark of host_reserved_total
        self.host_full_refusals = 0
        self._check_prompt_fits(kv_cache_spec.max_model_len)
        if self.host_pages:
            self._check_host_fits(kv_cache_spec.max_model_len)
        layout = self.layout
        logger.info_once(
            "vllm-kvevict: budget %d blocks of %d tokens (%d sink blocks); a request holds at most "
            "%d blocks once its prompt is processed", layout.budget_pages, layout.block_size,
            layout.sink_pages, layout.max_resident_pages)

    def _check_prompt_fits(self, max_model_len: int) -> None:
        """A prompt is prefilled in full, so one of ``max_model_len`` tokens must fit the pool."""
        usable_blocks = self.block_pool.num_gpu_blocks - 1  # the null block is never handed out
        if cdiv(max_model_len, self.block_size) > usable_blocks:
            raise EvictionConfigError(
                f"the KV cache holds {usable_blocks * self.block_size} tokens, but prompts are "
                f"prefilled in full and --max-model-len is {max_model_len}; lower --max-model-len "
                f"or give the KV cache more memory")

    def _check_host_fits(self, max_model_len: int) -> None:
        if cdiv(max_model_len, self.block_size) > self.host_pages:
            raise EvictionConfigError(
                f"--kv-host-space holds {self.host_pages * self.block_size} tokens of backed-up "
                f"pages, fewer than one --max-model-len {max_model_len} request; raise "
                f"--kv-host-space or lower --max-model-len")

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        num_blocks = super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)
        if self.host_pages and self._host_shortfall(request_id, num_tokens) > 0:
            self._count_refusal(request_id)
            # More than any pool can give: the scheduler waits or preempts, as for a full cache.
            return self.block_pool.num_gpu_blocks + 1
        return num_blocks

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args, **kwargs):
        self._kept_waiting.discard(request_id)
        if self.host_pages:
            need = cdiv(num_tokens, self.block_size)
            before = self.host_reserved.get(request_id, 0)
            if need > before:
                self.host_reserved[request_id] = need
                self.host_reserved_total += need - before
                self.host_reserved_peak = max(self.host_reserved_peak, self.host_reserved_total)
        return super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)

    def free(self, request_id: str) -> None:
        self._kept_waiting.discard(request_id)
        self.host_reserved_total -= self.host_reserved.pop(request_id, 0)
        super().free(request_id)

    def _count_refusal(self, request_id: str) -> None:
        self.host_full_refusals += 1
        if self.req_to_blocks.get(request_id):
            self.host_store_refusals["preempted"] += 1
        elif request_id not in self._kept_waiting:
            self._kept_waiting.add(request_id)
            self.host_store_refusals["waited"] += 1

    def _host_shortfall(self, request_id: str, num_tokens: int) -> int:
        extra = cdiv(num_tokens, self.block_size) - self.host_reserved.get(request_id, 0)
        return self.host_reserved_total + max(extra, 0) - self.host_pages

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        prefilling = num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens
        evicted = self.layout.evicted_pages(processed_computed_tokens, prefilling)
        self._remove_blocks_in_range(request_id, evicted.start, evicted.stop)

    def num_resident_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (null placeholders excluded)."""
        return sum(not block.is_null for block in self.req_to_blocks.get(request_id, ()))

    def num_resident_blocks_total(self) -> int:
        """Blocks all requests hold now (read for the metrics, not per step)."""
        return sum(not block.is_null for blocks in self.req_to_blocks.values() for block in blocks)
