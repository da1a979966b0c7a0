"""Marconi's alpha, tuned online by replaying recent requests (plain Python).

As in the paper: keep a window of the most recent requests (each as the chain of its blocks'
prefix hashes); every ``window`` new requests, replay the window through a simulated pool of the
real pool's size once per alpha of a small grid, with the same :class:`MarconiIndex` the pool
uses, and keep the alpha that saved the most prefill FLOPs. Ties keep the current alpha if it is
among the best, else the smallest (closest to LRU).

Simplifications, stated: the replay starts from an empty cache and runs the requests one after
another (each request's blocks held only while it runs), where the real pool interleaves them;
a request that does not fit the simulated pool caches only what fits. The replay runs in the
scheduler's process when a window completes (its duration is kept in ``last_tune_s``).
"""
from __future__ import annotations

import collections
import time
from typing import Callable, Hashable, Sequence

from vllm_kvevict.prefix_cache.marconi import MarconiIndex

DEFAULT_ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
DEFAULT_TUNE_WINDOW = 32


def replay(requests: Sequence[Sequence[Hashable]], alpha: float, capacity: int,
           block_size: int, efficiency: Callable[[int], float],
           flops: Callable[[int], float]) -> float:
    """Prefill FLOPs saved by prefix hits when ``requests`` (block-hash chains) run one after
    another through a pool of ``capacity`` blocks evicting by Marconi at ``alpha``."""
    index = MarconiIndex(efficiency, alpha)
    cached: dict[Hashable, int] = {}  # key -> block id
    key_of: dict[int, Hashable] = {}
    plain_free = list(range(capacity - 1, -1, -1))
    saved = 0.0
    for chain in requests:
        held: list[int] = []
        position = 0
        while position < len(chain) and chain[position] in cached:
            block_id = cached[chain[position]]
            if index.is_free(block_id):
                index.touch(block_id)
                held.append(block_id)
            saved += flops((position + 1) * block_size)
            position += 1
        for position in range(position, len(chain)):
            if plain_free:
                block_id = plain_free.pop()
            else:
                block_id = index.pop_victim()
                if block_id is None:
                    break  # every block is held by this request
                old_key = key_of.pop(block_id)
                if cached.get(old_key) == block_id:
                    del cached[old_key]
            key = chain[position]
            parent = chain[position - 1] if position else None
            index.cache(block_id, key, parent, (position + 1) * block_size)
            cached.setdefault(key, block_id)
            key_of[block_id] = key
            held.append(block_id)
        for block_id in reversed(held):
            index.free(block_id)
    return saved


class AlphaTuner:
    """Window of recent requests and the replay over ``grid``; see the module docstring."""

    def __init__(self, capacity: int, block_size: int, efficiency: Callable[[int], float],
                 flops: Callable[[int], float], window: int = DEFAULT_TUNE_WINDOW,
                 grid: Sequence[float] = DEFAULT_ALPHA_GRID, alpha: float = 0.0):
        if window <= 0:
            raise ValueError(f"tuning window must be positive, got {window}")
        self.capacity = capacity
        self.block_size = block_size
        self.efficiency = efficiency
        self.flops = flops
        self.window = window
        self.grid = tuple(grid)
        self.alpha = alpha
        self._recent: collections.OrderedDict[str, Sequence[Hashable]] = (
            collections.OrderedDict())
        self._new_since_tune = 0
        self.num_tunes = 0
        self.last_tune_s = 0.0
        self.last_scores: dict[float, float] = {}

    def record(self, request_id: str, block_hashes: Sequence[Hashable]) -> bool:
        """Note a request's hash chain (the live list: it grows as the request does). Returns
        whether a window is complete (``tune`` is due)."""
        if request_id in self._recent:
            return False
        self._recent[request_id] = block_hashes
        if len(self._recent) > self.window:
            self._recent.popitem(last=False)
        self._new_since_tune += 1
        return self._new_since_tune >= self.window

    def tune(self) -> float:
        """Replay the window at every alpha of the grid; adopt and return the best alpha."""
        start = time.perf_counter()
        chains = [list(chain) for chain in self._recent.values()]
        scores = {alpha: replay(chains, alpha, self.capacity, self.block_size, self.efficiency,
                                self.flops) for alpha in self.grid}
        best = max(scores.values())
        if scores.get(self.alpha) != best:
            self.alpha = min(alpha for alpha, score in scores.items() if score == best)
        self.last_scores = scores
        self.last_tune_s = time.perf_counter() - start
        self.num_tunes += 1
        self._new_since_tune = 0
        return self.alpha
