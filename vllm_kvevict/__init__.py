"""vllm-kvevict: eviction-aware KV-cache management for vLLM.

The algorithms (``paging``, ``policies``) are plain Python/torch and import no vLLM; the vLLM glue
(CLI flags, KV-cache spec and manager, attention backend) lives in ``vllm_kvevict.engine``.
"""

__version__ = "0.1.0"


def register() -> None:
    """Install the plugin in this process now.

    vLLM does this itself in every process it starts, but in a user's own process it loads plugins
    only while building the first ``EngineArgs``, after the keyword arguments were checked. Call
    this before ``vllm.LLM(model, kv_eviction_policy=...)``; ``additional_config=`` needs no call.
    """
    from vllm_kvevict.engine.plugin import register as register_plugin

    register_plugin()
