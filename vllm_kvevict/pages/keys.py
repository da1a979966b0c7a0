"""Keys of a row's blocks read from the KV cache as stored, and their products with queries."""
from __future__ import annotations

import torch

from vllm_kvevict.pages.formats import BlockFormat, CPUBlockFormat, FlashBlockFormat, key_tiles
from vllm_kvevict.paging import INT_OF_WIDTH


class BlockKeys:
    """Products ``q . k`` of queries with the keys of blocks, read from the cache as stored.

    The keys of each (block, head) are gathered in one pass straight into row-major
    ``[block_size, head_dim]`` order, rows' blocks grouped by head, so that one matrix product
    per row and head covers all the row's keys. A tiled layout (the CPU kernels store a block's
    keys as ``[block_size / tile_t, head_dim / tile_d, tile_t, tile_d]``; row-major is tiles
    ``(1, head_dim)``) is read through a strided view, each tile's run of ``tile_d`` channels
    moved as one integer word. Products are taken in the cache's dtype (float32 softmax
    follows); no float copy of the keys is made.

    ``tiles`` None: keys are read through the block format (a gather of whole pages).
    """

    def __init__(self, block_format: BlockFormat, tiles: tuple[int, int] | None):
        self.format = block_format
        self.tiles = tiles

    @classmethod
    def of(cls, block_format: BlockFormat, kv_cache: torch.Tensor) -> "BlockKeys":
        _, _, block_size, two_d = kv_cache.shape
        head_dim = two_d // 2
        tiles = None
        if isinstance(block_format, FlashBlockFormat):
            tiles = (1, head_dim)
        elif isinstance(block_format, CPUBlockFormat) and kv_cache.is_contiguous():
            key_index = block_format.key_index
            tiles = (1, head_dim) if key_index is None else key_tiles(key_index, block_size,
                                                                       head_dim)
        return cls(block_format, tiles)

    def gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``[R, kv_heads, C * block_size, head_dim]`` keys of ``blocks`` ``[R, C]``,
        row-major."""
        num_blocks, kv_heads, block_size, two_d = kv_cache.shape
        head_dim = two_d // 2
        rows, num_cols = blocks.shape
        if self.tiles is None:
            keys = self.format.keys(self.format.read(kv_cache, blocks.flatten()))  # [n, bs, kv, d]
            keys = keys.unflatten(0, (rows, num_cols)).permute(0, 3, 1, 2, 4)
            return keys.reshape(rows, kv_heads, num_cols * block_size, head_dim)
        heads = torch.arange(kv_heads, device=blocks.device)
        if isinstance(self.format, FlashBlockFormat):  # token-major keys, any strides
            keys = kv_cache[..., :head_dim][blocks.unsqueeze(1), heads[:, None]]  # [R, kv, C, ...]
            return keys.reshape(rows, kv_heads, num_cols * block_size, head_dim)
        # The CPU layout: per (block, head), the keys (in tiles), then the values. One index over
        # the (block, head) pairs in [R, kv, C] order gathers a row's keys of a head together.
        tile_t, tile_d = self.tiles
        pairs = (blocks.unsqueeze(1) * kv_heads + heads[:, None]).flatten()
        raw = kv_cache.view(num_blocks * kv_heads, block_size * two_d)[:, :block_size * head_dim]
        word = INT_OF_WIDTH.get(tile_d * raw.element_size())
        if word is not None and tile_d > 1:
            raw, tile_d = raw.view(word), 1
        tiles = raw.unflatten(1, (block_size // tile_t, head_dim // self.tiles[1], tile_t, tile_d))
        keys = tiles.transpose(2, 3).index_select(0, pairs)  # row-major, contiguous
        return keys.view(kv_cache.dtype).view(rows, kv_heads, num_cols * block_size, head_dim)

    def logits(self, kv_cache: torch.Tensor, blocks: torch.Tensor, queries: torch.Tensor,
               scale: float) -> torch.Tensor:
        """``[R, n, kv_heads, group, C * block_size]`` products ``scale * q . k`` of ``queries``
        ``[R, n, q_heads, head_dim]`` with the keys of each row's blocks ``[R, C]``, in column
        order, in the cache's dtype."""
        rows, n, _, head_dim = queries.shape
        kv_heads = kv_cache.shape[1]
        keys = self.gather(kv_cache, blocks).flatten(0, 1)  # [R * kv, C * bs, d]
        q = (queries * scale).to(keys.dtype).unflatten(2, (kv_heads, -1)).transpose(1, 2)
        group = q.shape[3]
        q = q.reshape(rows * kv_heads, n * group, head_dim)  # [R * kv, n * g, d]
        if n * group < head_dim:  # thin: keys on the left run faster, then a small transpose
            out = torch.bmm(keys, q.transpose(1, 2))  # [R * kv, C * bs, n * g]
            return out.view(rows, kv_heads, -1, n, group).permute(0, 3, 1, 4, 2).contiguous()
        out = torch.bmm(q, keys.transpose(1, 2))  # [R * kv, n * g, C * bs]
        return out.view(rows, kv_heads, n, group, -1).transpose(1, 2)
