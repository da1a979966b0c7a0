"""vLLM 0.32's FlashAttention KV cache on CPU: the same views, strides and cache writes.

``flash_layer_caches`` allocates one backing buffer and views it per layer with vLLM's own
``create_kv_cache_views`` (as the GPU worker does), so each layer's cache has the logical shape
``[num_blocks, kv_heads, block_size, 2 * head_dim]`` and the strides of the resolved
``KVCacheLayout``. ``write_tokens`` runs vLLM's own ``FlashAttentionImpl.do_kv_cache_update``,
which splits the cache into key and value views; only the CUDA op it ends in,
``reshape_and_cache_flash``, is replaced by its definition in torch (token ``i`` goes to slot
``slot_mapping[i]``, i.e. block ``slot // block_size``, offset ``slot % block_size``).
"""
from __future__ import annotations

import types

import torch

DEFAULT_LAYOUT = "LBNHC"  # vLLM 0.32's first choice when no backend declares layouts


def flash_layer_caches(num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int, dtype=torch.float32, layout: str = DEFAULT_LAYOUT,
                       device="cpu") -> list[torch.Tensor]:
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor,
                                            create_kv_cache_views)
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=kv_heads, head_size=head_dim,
                             dtype=dtype)
    resolved = KVCacheLayout[layout]
    page = spec.page_size_bytes
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    if resolved.is_layer_compact:
        tensor = KVCacheTensor(size=page * num_blocks * num_layers, layers=layers,
                               layer_stride=page * num_blocks, block_stride=page)
    else:
        tensor = KVCacheTensor(size=page * num_blocks * num_layers, layers=layers,
                               layer_stride=page, block_stride=page * num_layers)
    raw = torch.zeros(tensor.size, dtype=torch.int8, device=device)
    return create_kv_cache_views(raw, spec, num_blocks, resolved, tensor)


def random_key_value_views(num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                           dtype, device, layout: str = DEFAULT_LAYOUT):
    """Random keys and values of one layer, as the views FlashAttention's forward reads:
    ``kv_cache.transpose(1, 2).split(head_dim, dim=-1)``, each ``[blocks, block, heads, d]``."""
    kv_cache = flash_layer_caches(2, num_blocks, block_size, kv_heads, head_dim, dtype, layout,
                                  device)[1]
    kv_cache.copy_(torch.randn(kv_cache.shape).to(dtype))
    return kv_cache.transpose(1, 2).split(head_dim, dim=-1)


def _reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, *_):
    block_size = key_cache.shape[1]
    n = slot_mapping.numel()
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    key_cache[blocks, offsets] = key[:n].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[:n].to(value_cache.dtype)


def write_tokens(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, kv_heads, head_dim]`` as FlashAttention does."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends import flash_attn

    impl = types.SimpleNamespace(attn_type=AttentionType.DECODER, head_size=key.shape[-1],
                                 kv_cache_dtype="auto")
    layer = types.SimpleNamespace(_k_scale=1.0, _v_scale=1.0)
    saved = getattr(flash_attn, "reshape_and_cache_flash", None)
    flash_attn.reshape_and_cache_flash = _reshape_and_cache_flash
    try:
        flash_attn.FlashAttentionImpl.do_kv_cache_update(impl, layer, key, value, kv_cache,
                                                         slot_mapping)
    finally:
        if saved is None:
            del flash_attn.reshape_and_cache_flash
        else:
            flash_attn.reshape_and_cache_flash = saved


def read_value(kv_cache: torch.Tensor, block: int, offset: int) -> torch.Tensor:
    """``[kv_heads, head_dim]`` value of one token, read through the backend's value view."""
    head_dim = kv_cache.shape[-1] // 2
    _, value_cache = kv_cache.transpose(1, 2).split(head_dim, dim=-1)
    return value_cache[block, offset]
