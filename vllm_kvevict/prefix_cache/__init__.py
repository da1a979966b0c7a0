"""Which cached prefix block a prefix cache gives up (plain Python, no vLLM).

vLLM's prefix cache keeps the blocks of finished requests, hashed by their prefix, as free blocks
that a later request with the same prefix can reuse; when a free block must be taken and only
cached ones are left, stock vLLM gives up the least recently used. ``marconi`` (Marconi,
MLSys'25) gives up the one with the lowest utility instead, weighing recency against the compute
a cached block saves per byte it holds:

* ``marconi.py``: the FLOPs a block saves (:class:`BlockCost`), the candidate index
  (:class:`MarconiIndex`: leaves of the cached prefix tree, bucketed by depth) and its choice;
* ``tuning.py``: alpha tuned online by replaying recent requests over a grid.

The vLLM glue (a ``BlockPool`` whose free queue asks the index) is ``engine/prefix_cache.py``.
"""
