"""CUDA: FlashAttention over resident pages, vLLM's ``CUSTOM`` attention backend.

Same mechanism as the CPU backend (:mod:`vllm_kvevict.engine.backend`): compact block tables and
sequence lengths before FlashAttention's own builder runs; page work (arkvale, quest, h2o...)
around the kernel. An evicting policy selects this backend by itself on CUDA, with the V1 model
runner and piecewise CUDA graphs (:func:`vllm_kvevict.engine.cli.adapt_engine_args`).

Nothing here has run on a GPU (the GPU machines lent to this project have no vLLM). CI runs every
line but the kernel launches on CPU: the builder's ``build`` over CPU tensors, its CUDA-graph
support, the block format over CPU tensors in vLLM 0.32's FlashAttention layouts
(``tests/engine/test_cuda_path.py``, ``tests/test_pages.py``).
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
        return forward_with_pages(super().forward, layer, query, key, value, kv_cache,
                                  attn_metadata, output, *args, **kwargs)


class EvictingFlashAttentionMetadataBuilder(EvictingBuilderMixin, FlashAttentionMetadataBuilder):
    def block_format(self, layer, kv_cache):
        return FlashBlockFormat()


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
