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
    """

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.layout = kv_cache_spec.layout
        self._check_prompt_fits(kv_cache_spec.max_model_len)
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

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        prefilling = num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens
        evicted = self.layout.evicted_pages(processed_computed_tokens, prefilling)
        self._remove_blocks_in_range(request_id, evicted.start, evicted.stop)

    def num_resident_blocks(self, request_id: str) -> int:
        """Blocks the request holds now (null placeholders excluded)."""
        return sum(not block.is_null for block in self.req_to_blocks.get(request_id, ()))
