"""Marconi's eviction choice for a block prefix cache (Pan et al., MLSys 2025), in plain Python.

A cached block is one node of the prefix tree: its hash chains over every token before it, so
its parent is the block holding the tokens just before it. Marconi gives up, among the *leaves*
(cached blocks no other cached block depends on) that are free (no running request holds them),
the one with the lowest utility

    U = norm(recency) + alpha * norm(FLOPs saved / bytes held)

with both terms min-max normalised over the candidates. A block at depth P (the prefix up to its
last token) saves the linear layers for its own tokens and their attention over the whole prefix,
so deeper blocks save more per byte; with every block of the pool the same size, the bytes drop
out of the normalised term and only the depth matters.

Cost of a choice: the candidates are bucketed by depth (one efficiency per bucket) and each
bucket keeps its members in recency order (two lazy heaps). The block with the lowest U in a
bucket is its least recent one, so a choice compares one head per non-empty bucket, never a scan
of the cached blocks. Min-max normalisation over the candidates is exact: the oldest and newest
candidate are among the buckets' heads and tails. Buckets are depth classes, by default 4 per
doubling of the depth (each scored by the efficiency at its lower edge), so a choice compares at
most ~4 log2(max_model_len) heads; ``classes_per_octave=None`` gives one bucket per depth.

Invariants (checked by ``check``):

* a candidate is registered (cached), free and a leaf: no cached block names its key as parent;
* a free cached block that is not a leaf waits outside the buckets and becomes a candidate when
  its last cached child is uncached; so a chain is always given up from its tail, never from the
  middle (the paper's radix-tree leaves);
* recency stamps grow by one for every block freed, in the order blocks are freed, so at
  ``alpha = 0`` the choice is vLLM's LRU order restricted to leaves.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Hashable

Key = Hashable
DEFAULT_CLASSES_PER_OCTAVE = 4


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """FLOPs a cached block saves (prefill work not redone) and the bytes it holds.

    Dense decoder layers: per token ``2 * (d * (H + 2 * KV) * hd + H * hd * d + 3 * d * I)``
    for the QKV, output and gated-MLP projections; attention of a token at position ``p`` over
    ``p + 1`` tokens costs ``4 * H * hd * (p + 1)`` (scores and weighted values). The logits are
    not counted: prefill computes them for the last token only. For hybrid models the attention
    term counts the attending layers only and every layer is costed as dense projections (an
    approximation of SSM mixers).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    block_size: int
    bytes_per_block: int
    num_attention_layers: int | None = None  # hybrids: the layers that attend (None: all)

    @classmethod
    def from_hf_config(cls, config, block_size: int, bytes_per_block: int) -> "BlockCost":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layer_types = getattr(config, "layer_types", None) or ()
        attending = sum(kind in ("full_attention", "attention") for kind in layer_types)
        return cls(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   num_attention_layers=attending or None,
                   num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", heads),
                   head_dim=head_dim,
                   intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
                   block_size=block_size, bytes_per_block=bytes_per_block)

    @property
    def linear_flops_per_token(self) -> int:
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * self.intermediate_size
        return 2 * self.num_layers * per_layer

    def flops(self, end_tokens: int) -> int:
        """FLOPs saved by the block whose last token is at position ``end_tokens - 1``."""
        start = max(0, end_tokens - self.block_size)
        # sum of (p + 1) for p in [start, end_tokens)
        attended = (end_tokens * (end_tokens + 1) - start * (start + 1)) // 2
        layers = self.num_attention_layers or self.num_layers
        attention = 4 * layers * self.num_heads * self.head_dim * attended
        return (end_tokens - start) * self.linear_flops_per_token + attention

    def efficiency(self, end_tokens: int) -> float:
        """FLOPs saved per byte held."""
        return self.flops(end_tokens) / self.bytes_per_block


class _Bucket:
    """Candidates of one depth class in recency order: a lazy min-heap over live stamps."""

    __slots__ = ("efficiency", "live", "heap")

    def __init__(self, efficiency: float):
        self.efficiency = efficiency
        self.live: dict[int, int] = {}  # block id -> stamp
        self.heap: list[tuple[int, int]] = []  # (stamp, block id), stale entries dropped late

    def add(self, block_id: int, stamp: int) -> None:
        self.live[block_id] = stamp
        heapq.heappush(self.heap, (stamp, block_id))
        if len(self.heap) > 2 * len(self.live) + 32:
            self.heap = [(s, b) for b, s in self.live.items()]
            heapq.heapify(self.heap)

    def oldest(self) -> tuple[int, int]:
        heap, live = self.heap, self.live
        while live.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0]


class MarconiIndex:
    """The cached blocks of a pool as a prefix tree, and Marconi's choice among its free leaves.

    The caller reports what happens to blocks: ``cache`` (a block got a key, and its parent's
    key), ``free`` (no request holds it any more), ``touch`` (a request holds it again),
    ``uncache`` (its key is gone); ``pop_victim`` picks the block to give up and uncaches it.

    Args:
        efficiency: FLOPs saved per byte by a block whose prefix ends at a given token count.
        alpha: weight of the efficiency term (0: LRU among leaves).
        classes_per_octave: depth resolution of the buckets: depths are grouped in
            ``classes_per_octave`` classes per doubling, each scored by the efficiency at its
            lower edge (``None``: one bucket per depth, exact). Fewer buckets make a choice
            cheaper; inside a class the least recent block goes first.
    """

    def __init__(self, efficiency: Callable[[int], float], alpha: float = 0.0,
                 classes_per_octave: int | None = DEFAULT_CLASSES_PER_OCTAVE):
        self.efficiency = efficiency
        self.alpha = alpha
        self.classes_per_octave = classes_per_octave
        self._class_of: dict[int, int] = {}  # depth (tokens) -> bucket key (memo)
        self._key: dict[int, Key] = {}
        self._parent: dict[int, Key | None] = {}
        self._tokens: dict[int, int] = {}
        self._holders: dict[Key, set[int]] = {}  # key -> cached block ids under it
        self._children: dict[Key, int] = {}  # key -> cached blocks whose parent is key
        self._free: dict[int, int] = {}  # free cached block id -> stamp of its release
        self._buckets: dict[int, _Bucket] = {}  # depth (tokens) -> candidates
        self._candidate_depth: dict[int, int] = {}
        self._newest: list[tuple[int, int]] = []  # (-stamp, block id) of candidates, lazy
        self._clock = 0

    # --- what happens to blocks -----------------------------------------------------------

    def cache(self, block_id: int, key: Key, parent: Key | None, num_tokens: int) -> None:
        """``block_id`` now holds the prefix ``key`` (child of ``parent``) ending at
        ``num_tokens``."""
        if self._key.get(block_id) == key:
            return
        if block_id in self._key:
            self.uncache(block_id)
        self._key[block_id] = key
        self._parent[block_id] = parent
        self._tokens[block_id] = num_tokens
        self._holders.setdefault(key, set()).add(block_id)
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1
            if self._children[parent] == 1:
                for holder in self._holders.get(parent, ()):
                    self._leave_candidates(holder)
        if block_id in self._free:
            self._maybe_candidate(block_id)

    def uncache(self, block_id: int) -> bool:
        """``block_id`` lost its key. Returns whether it was a free cached block (the caller
        then keeps it as a plain free block)."""
        key = self._key.pop(block_id, None)
        if key is None:
            return False
        self._leave_candidates(block_id)
        was_free = self._free.pop(block_id, None) is not None
        parent = self._parent.pop(block_id)
        del self._tokens[block_id]
        holders = self._holders[key]
        holders.discard(block_id)
        if not holders:
            del self._holders[key]
        if parent is not None:
            left = self._children[parent] - 1
            if left:
                self._children[parent] = left
            else:
                del self._children[parent]
                for holder in self._holders.get(parent, ()):
                    self._maybe_candidate(holder)
        return was_free

    def free(self, block_id: int) -> None:
        """No request holds the cached ``block_id`` any more; it is stamped most recent."""
        assert block_id in self._key, f"block {block_id} is not cached"
        assert block_id not in self._free, f"block {block_id} freed twice"
        self._clock += 1
        self._free[block_id] = self._clock
        self._maybe_candidate(block_id)

    def touch(self, block_id: int) -> None:
        """A request holds the free cached ``block_id`` again."""
        del self._free[block_id]
        self._leave_candidates(block_id)

    def clear(self) -> list[int]:
        """Forget every key (prefix cache reset); returns the block ids that were free."""
        free = list(self._free)
        self.__init__(self.efficiency, self.alpha, self.classes_per_octave)
        return free

    # --- the choice ------------------------------------------------------------------------

    def pop_victim(self) -> int | None:
        """The free cached block to give up, already uncached; None if there is none.

        The lowest-utility leaf. Only if no free block is a leaf (each free cached block has a
        cached child that a running request holds under another block id, possible because vLLM
        does not de-duplicate blocks) the least recent free cached block is taken.
        """
        if self._buckets:
            victim = self._lowest_utility()
        elif self._free:
            victim = min(self._free, key=self._free.__getitem__)
        else:
            return None
        self.uncache(victim)
        return victim

    def _lowest_utility(self) -> int:
        buckets = list(self._buckets.values())
        heads = [bucket.oldest() for bucket in buckets]
        if len(buckets) == 1:
            return heads[0][1]
        r_min = min(heads)[0]
        newest, free, depth_of = self._newest, self._free, self._candidate_depth
        while newest[0][1] not in depth_of or free[newest[0][1]] != -newest[0][0]:
            heapq.heappop(newest)
        r_span = -newest[0][0] - r_min or 1
        efficiencies = [bucket.efficiency for bucket in buckets]
        e_min = min(efficiencies)
        e_span = (max(efficiencies) - e_min) or 1.0
        # U * r_span = (stamp - r_min) + weight * (efficiency - e_min): rank by stamp + weight * e
        weight = self.alpha * r_span / e_span
        best = min(range(len(buckets)),
                   key=lambda i: (heads[i][0] + weight * efficiencies[i], heads[i][0]))
        return heads[best][1]

    # --- state -----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    def candidates(self) -> set[int]:
        return set(self._candidate_depth)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._key

    def key_of(self, block_id: int) -> Key | None:
        return self._key.get(block_id)

    def parent_of(self, block_id: int) -> Key | None:
        return self._parent.get(block_id)

    def free_blocks(self) -> list[int]:
        return list(self._free)

    def free_stamp(self, block_id: int) -> int:
        return self._free[block_id]

    def check(self) -> None:
        """Assert the invariants of the module docstring (tests)."""
        for block_id, depth in self._candidate_depth.items():
            assert block_id in self._free and block_id in self._key
            assert self._children.get(self._key[block_id], 0) == 0, "candidate has a child"
            assert self._buckets[depth].live[block_id] == self._free[block_id]
        for block_id in self._free:
            leaf = self._children.get(self._key[block_id], 0) == 0
            assert leaf == (block_id in self._candidate_depth), f"block {block_id} misfiled"
        counted: dict[Key, int] = {}
        for parent in self._parent.values():
            if parent is not None:
                counted[parent] = counted.get(parent, 0) + 1
        assert counted == self._children

    # --- internals -------------------------------------------------------------------------

    def _maybe_candidate(self, block_id: int) -> None:
        if (block_id in self._free and block_id not in self._candidate_depth
                and self._children.get(self._key[block_id], 0) == 0):
            depth = self._depth_class(self._tokens[block_id])
            bucket = self._buckets.get(depth)
            if bucket is None:
                bucket = self._buckets[depth] = _Bucket(self.efficiency(depth))
            stamp = self._free[block_id]
            bucket.add(block_id, stamp)
            self._candidate_depth[block_id] = depth
            heapq.heappush(self._newest, (-stamp, block_id))
            if len(self._newest) > 2 * len(self._candidate_depth) + 32:
                self._newest = [(-self._free[b], b) for b in self._candidate_depth]
                heapq.heapify(self._newest)

    def _depth_class(self, tokens: int) -> int:
        """The bucket's depth: ``tokens`` itself, or the lower edge of its class."""
        if self.classes_per_octave is None:
            return tokens
        edge = self._class_of.get(tokens)
        if edge is None:
            steps = math.floor(math.log2(tokens) * self.classes_per_octave + 1e-9)
            edge = self._class_of[tokens] = min(tokens, math.ceil(
                2 ** (steps / self.classes_per_octave) - 1e-9))
        return edge

    def _leave_candidates(self, block_id: int) -> None:
        depth = self._candidate_depth.pop(block_id, None)
        if depth is not None:
            bucket = self._buckets[depth]
            del bucket.live[block_id]  # its heap entries go stale, dropped when they surface
            if not bucket.live:
                del self._buckets[depth]
