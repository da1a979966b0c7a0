"""CUDA: FlashAttention over resident pages, registered as ``--attention-backend CUSTOM``.

Same mechanism as the CPU backend (:mod:`vllm_kvevict.engine.backend`): compact block tables and
sequence lengths before FlashAttention's own builder runs. Not exercised by CI (no GPU there).
"""
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)

from vllm_kvevict.engine.backend import (EvictingBuilderMixin, customize_for_eviction,
                                         remember_worker_config)


class EvictingFlashAttentionImpl(FlashAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        remember_worker_config()


class EvictingFlashAttentionMetadataBuilder(EvictingBuilderMixin, FlashAttentionMetadataBuilder):
    pass


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
