"""vllm-kvevict: eviction-aware KV-cache management for vLLM.

The algorithms (``paging``, ``policies``) are plain Python/torch and import no vLLM; the vLLM glue
(CLI flags, KV-cache spec and manager, attention backend) lives in ``vllm_kvevict.engine``.
"""

__version__ = "0.1.0"
