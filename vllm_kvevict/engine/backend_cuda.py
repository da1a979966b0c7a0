"""CUDA: FlashAttention over resident pages, registered as ``--attention-backend CUSTOM``.

Same mechanism as the CPU backend (:mod:`vllm_kvevict.engine.backend`): compact block tables and
sequence lengths before FlashAttention's own builder runs; page work (arkvale) around the kernel.
Not exercised by CI (no GPU there) and not yet run: GPU machines lent to this project have no vLLM.
"""
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)

from vllm_kvevict.engine.backend import (EvictingBuilderMixin, customize_for_eviction,
                                         forward_with_pages, remember_worker_config)
from vllm_kvevict.pages import FlashBlockFormat


class EvictingFlashAttentionImpl(FlashAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_worker_config()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        return forward_with_pages(self, super().forward, layer, query, key, value, kv_cache,
                                  attn_metadata, output, *args, **kwargs)


class EvictingFlashAttentionMetadataBuilder(EvictingBuilderMixin, FlashAttentionMetadataBuilder):
    page_block_format = FlashBlockFormat()


class EvictingFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return EvictingFlashAttentionImpl

    @classmethod
    def customize_spec(cls, spec):
        return customize_for_eviction(super().customize_spec(spec))

    @staticmethod
    def get_builder_cls():
        return EvictingFlashAttentionMetadataBuilder
