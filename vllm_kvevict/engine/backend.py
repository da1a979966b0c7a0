"""Attention backends that attend over exactly a request's resident pages.

The backend wraps the platform's stock backend and changes one thing: before the stock metadata
builder runs, each row of the batch's block table is compacted to its resident pages and its
sequence length shrunk accordingly (:func:`compact_common_metadata`). Keys were written with RoPE
at their original positions, so the stock kernel then computes attention over exactly the
resident tokens. KV writes (slot mapping) are untouched: new tokens go to blocks the request owns.

When the layer's spec is not an :class:`EvictingAttentionSpec` (policy ``none``), the builder is
the stock one, byte for byte.

On CPU the override replaces the ``CPU_ATTN`` member (the CPU platform always picks it); on CUDA it
fills the ``CUSTOM`` member, selected with ``--attention-backend CUSTOM``, over FlashAttention.
"""
from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.engine.kv_spec import EvictingAttentionSpec
from vllm_kvevict.paging import PageLayout


def compact_common_metadata(cm: CommonAttentionMetadata, layout: PageLayout) -> CommonAttentionMetadata:
    """Return ``cm`` with block tables and sequence lengths restricted to resident pages."""
    if cm.is_prefilling is None:
        raise RuntimeError("vllm-kvevict needs CommonAttentionMetadata.is_prefilling (V1 runner)")
    device = cm.block_table_tensor.device
    query_lens = cm.query_start_loc[1:] - cm.query_start_loc[:-1]
    prefilling = cm.is_prefilling.to(device=device, non_blocking=True)
    table, seq_lens = layout.compact_block_table(cm.block_table_tensor, cm.seq_lens, query_lens,
                                                 prefilling)
    # Host-side lengths for the builders' scheduling work, shrunk the same way.
    query_lens_cpu = cm.query_start_loc_cpu[1:] - cm.query_start_loc_cpu[:-1]
    upper = cm.seq_lens_cpu_upper_bound
    if upper is None:
        upper = cm.seq_lens.cpu()
    evicted = layout.num_evicted_pages(upper - query_lens_cpu, cm.is_prefilling.cpu())
    upper = (upper - evicted * layout.block_size).to(upper.dtype)
    num_reqs = cm.num_reqs
    max_seq_len = int(upper[:num_reqs].max()) if num_reqs else cm.max_seq_len
    return dataclasses.replace(cm, block_table_tensor=table, seq_lens=seq_lens,
                               seq_lens_cpu_upper_bound=upper, max_seq_len=max_seq_len)


_worker_config: EvictionConfig | None = None
_worker_max_model_len: int | None = None


def remember_worker_config() -> None:
    """Record this process's eviction settings; called where vLLM's current config is set.

    NOTE: vLLM asks the backend for its KV-cache spec (``customize_spec``) outside any
    ``set_current_vllm_config`` context, but only after the model (and so every attention impl)
    was built inside one. Impls therefore record the settings, and ``customize_spec`` reads them.
    """
    from vllm.config import get_current_vllm_config

    global _worker_config, _worker_max_model_len
    vllm_config = get_current_vllm_config()
    _worker_config = EvictionConfig.from_vllm_config(vllm_config)
    _worker_max_model_len = vllm_config.model_config.max_model_len


def customize_for_eviction(spec):
    """The layer spec under the configured policy: an :class:`EvictingAttentionSpec` or ``spec``."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if _worker_config is None:
        raise RuntimeError("vllm-kvevict: KV-cache spec requested before any attention layer was built")
    config = _worker_config
    # MLA, sliding-window and hybrid models are refused at start-up (engine.cli).
    if (not config.evicts or type(spec) is not FullAttentionSpec
            or spec.sliding_window is not None or spec.attention_chunk_size is not None):
        return spec
    return EvictingAttentionSpec.from_full_attention(spec, config.layout(spec.block_size),
                                                     _worker_max_model_len)


class EvictingBuilderMixin:
    """Compacts the batch to resident pages before the stock ``build``."""

    kv_cache_spec: object

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False):
        if isinstance(self.kv_cache_spec, EvictingAttentionSpec):
            common_attn_metadata = compact_common_metadata(common_attn_metadata,
                                                           self.kv_cache_spec.layout)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class EvictingCPUAttentionMetadataBuilder(EvictingBuilderMixin, CPUAttentionMetadataBuilder):
    pass


class EvictingCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_worker_config()


class EvictingCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` over resident pages."""

    @staticmethod
    def get_impl_cls():
        return EvictingCPUAttentionImpl

    @classmethod
    def customize_spec(cls, spec):
        return customize_for_eviction(super().customize_spec(spec))

    @staticmethod
    def get_builder_cls():
        return EvictingCPUAttentionMetadataBuilder


def register_backend() -> None:
    """Install the evicting backend over the platform's default (idempotent)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register_backend

    if current_platform.is_cpu():
        vllm_register_backend(AttentionBackendEnum.CPU_ATTN,
                              f"{__name__}.EvictingCPUAttentionBackend")
    elif current_platform.is_cuda():
        vllm_register_backend(AttentionBackendEnum.CUSTOM,
                              "vllm_kvevict.engine.backend_cuda.EvictingFlashAttentionBackend")
