"""How a layer's KV-cache tensor stores a block (a page), per backend."""
from __future__ import annotations

import torch


class BlockFormat:
    """How one layer's KV-cache tensor stores a block (a page).

    vLLM 0.32 gives every layer a view ``[num_blocks, kv_heads, block_size, 2 * head_dim]``
    (strided in the engine's resolved ``KVCacheLayout``): blocks are the first dimension, and
    what differs between backends is where a block keeps its keys (:meth:`keys`).
    """

    def page_shape(self, kv_cache: torch.Tensor) -> tuple[int, ...]:
        return tuple(kv_cache.shape[1:])

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """``[n, *page_shape]`` contiguous copies of the blocks."""
        return kv_cache.index_select(0, block_ids)

    def write(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, pages: torch.Tensor) -> None:
        kv_cache.index_copy_(0, block_ids, pages.to(kv_cache.device, non_blocking=True))

    def keys(self, pages: torch.Tensor) -> torch.Tensor:
        """``[n, block_size, num_kv_heads, head_dim]`` keys of ``read`` pages."""
        raise NotImplementedError

    def key_offsets(self, block_size: int, head_dim: int) -> torch.Tensor:
        """``[block_size * head_dim]``: where key ``(t, d)`` of a head sits in the head's
        ``[block_size, 2 * head_dim]`` tile of a block, read row-major."""
        raise NotImplementedError


class CPUBlockFormat(BlockFormat):
    """vLLM's CPU layout (``LBHNC``); per head, the first ``block_size * head_dim`` elements
    hold the keys, the rest the values.

    The CPU kernels store a block's keys in an ISA-specific order (e.g. transposed,
    ``[head_dim, block_size]``, for AVX-512). ``key_index[t * head_dim + d]`` is the element
    holding key ``(t, d)``; ``None`` means row-major ``[block_size, head_dim]``.
    """

    def __init__(self, key_index: torch.Tensor | None = None):
        self.key_index = key_index
        self._tiles: dict[tuple[int, int], tuple[int, int] | None] = {}

    def keys(self, pages):
        n, kv_heads, block_size, two_d = pages.shape
        head_dim = two_d // 2
        raw = pages.reshape(n, kv_heads, 2 * block_size * head_dim)[:, :, :block_size * head_dim]
        if self.key_index is not None:
            tiles = self._tiles.get((block_size, head_dim), False)
            if tiles is False:
                tiles = self._tiles[block_size, head_dim] = key_tiles(self.key_index, block_size,
                                                                      head_dim)
            if tiles is None:
                raw = raw.index_select(2, self.key_index.to(raw.device))
            else:  # a tiled layout: views and one copy instead of a gather
                tile_t, tile_d = tiles
                raw = raw.reshape(n, kv_heads, block_size // tile_t, head_dim // tile_d, tile_t,
                                  tile_d).transpose(3, 4)
        return raw.reshape(n, kv_heads, block_size, head_dim).permute(0, 2, 1, 3)


    def key_offsets(self, block_size, head_dim):
        if self.key_index is None:
            return torch.arange(block_size * head_dim)
        return self.key_index.cpu()


def key_tiles(key_index: torch.Tensor, block_size: int, head_dim: int) -> tuple[int, int] | None:
    """``(tile_t, tile_d)`` if ``key_index`` is the layout ``[block_size / tile_t,
    head_dim / tile_d, tile_t, tile_d]`` (row-major is ``(1, head_dim)``, transposed
    ``(block_size, 1)``; the CPU kernels' VNNI packing for AMX is ``(16, 2)``), else None."""
    t = torch.arange(block_size).unsqueeze(1)
    d = torch.arange(head_dim).unsqueeze(0)
    for tile_t in (n for n in range(1, block_size + 1) if block_size % n == 0):
        for tile_d in (n for n in range(1, head_dim + 1) if head_dim % n == 0):
            element = (((t // tile_t) * (head_dim // tile_d) + d // tile_d) * (tile_t * tile_d)
                       + (t % tile_t) * tile_d + d % tile_d)
            if torch.equal(element.flatten(), key_index.cpu()):
                return tile_t, tile_d
    return None


class FlashBlockFormat(BlockFormat):
    """FlashAttention's reading of the layer view: a token's key, then its value, in the last
    dimension; the backend splits it as ``kv_cache.transpose(1, 2).split(head_dim, dim=-1)``.
    The physical order is the engine's ``KVCacheLayout`` (``LBNHC``, tokens outside heads, by
    default); pages read here are contiguous whatever the strides.
    """

    def keys(self, pages):
        return self.key_cache(pages)

    def key_offsets(self, block_size, head_dim):
        t = torch.arange(block_size).unsqueeze(1)
        return (t * 2 * head_dim + torch.arange(head_dim)).flatten()

    def key_cache(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """``[blocks, block_size, kv_heads, head_dim]`` key view of a cache (or of pages), as
        FlashAttention's forward splits it off."""
        head_dim = kv_cache.shape[-1] // 2
        return kv_cache[..., :head_dim].transpose(1, 2)
