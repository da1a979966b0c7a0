"""KV-cache spec for layers under an evicting policy, and its registration.

The spec is a :class:`FullAttentionSpec` that also carries the page budget, so the scheduler-side
manager and the worker-side backend read one layout. It is grouped with full attention (same
memory layout), is not prefix-cacheable, and reports the budget as a request's memory need, which
is what vLLM's startup "maximum concurrency" line divides the pool by.
"""
from __future__ import annotations

import dataclasses

from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvevict.paging import PageLayout, cdiv


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvictingAttentionSpec(FullAttentionSpec):
    """Full attention whose requests hold at most ``budget_pages + 1`` blocks after prefill."""

    budget_pages: int
    sink_pages: int
    window_pages: int
    top_k_pages: int
    max_model_len: int  # the longest prompt, prefilled in full
    host_pages: int = 0  # pages (all layers of this rank) the host backup holds; 0: no backup

    @property
    def layout(self) -> PageLayout:
        return PageLayout(block_size=self.block_size, budget_pages=self.budget_pages,
                          sink_pages=self.sink_pages, window_pages=self.window_pages,
                          top_k_pages=self.top_k_pages)

    @property
    def prefix_cacheable(self) -> bool:
        return False

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """Steady-state blocks of one request: the budget plus the page being filled.

        A prompt is prefilled with full attention, so a request transiently holds its whole prompt;
        the manager checks at start-up that one ``max_model_len`` prompt fits in the pool.
        """
        full_pages = cdiv(vllm_config.model_config.max_model_len, self.block_size)
        return min(full_pages, self.layout.max_resident_pages) * self.page_size_bytes

    @classmethod
    def from_full_attention(cls, spec: FullAttentionSpec, layout: PageLayout,
                            max_model_len: int, host_pages: int = 0) -> "EvictingAttentionSpec":
        assert layout.block_size == spec.block_size, (layout, spec)
        base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**base, budget_pages=layout.budget_pages, sink_pages=layout.sink_pages,
                   window_pages=layout.window_pages, top_k_pages=layout.top_k_pages,
                   max_model_len=max_model_len, host_pages=host_pages)

    @classmethod
    def merge(cls, specs: list["EvictingAttentionSpec"]) -> "EvictingAttentionSpec":
        settings = {(spec.layout, spec.max_model_len, spec.host_pages) for spec in specs}
        assert len(settings) == 1, f"all layers must share one eviction layout, got {settings}"
        layout, max_model_len, host_pages = settings.pop()
        return cls.from_full_attention(FullAttentionSpec.merge(specs), layout, max_model_len,
                                       host_pages)


def register_spec() -> None:
    """Map :class:`EvictingAttentionSpec` to its manager in vLLM's spec registry (idempotent)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_kvevict.engine.kv_manager import EvictingAttentionManager

    # The registry fills itself with vLLM's built-in specs only while it is empty.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(EvictingAttentionSpec, EvictingAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)
