"""Triton kernels for the CUDA path, each with a plain-torch reference.

Every kernel body is written once and launched two ways (:mod:`.launch`): compiled by Triton for
CUDA tensors, or run by Triton's interpreter for CPU tensors, which is how CI checks the same
indexing without a GPU. The references live in :mod:`.reference` and in
:mod:`vllm_kvevict.algorithms`.

Layouts (vLLM's FlashAttention cache, one layer): keys and values are
``[num_blocks, page_size, num_kv_heads, head_dim]`` views with a contiguous last dimension.
"""
