"""``streamingllm``: attention sinks + the most recent pages (Xiao et al., 2023, arXiv:2309.17453).

The paper keeps 4 sink tokens and a recent window and evicts the oldest token for good. vLLM's cache
is paged, so here the unit is a page (a vLLM block): the first ``ceil(sink_tokens / block_size)``
pages stay, and the budget's remaining pages hold the most recent full pages; older pages are freed
and never come back. Differences from the paper: the prompt is prefilled with full attention and
eviction starts with the first decode step; keys keep their original RoPE positions (no
re-positioning inside the cache), as in EasyKV's recency baseline.
"""
import dataclasses

from vllm_kvevict.policies.base import EvictionPolicy


@dataclasses.dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """Sinks + recent window, permanent eviction (see :meth:`PageLayout.evicted_pages`)."""

    name = "streamingllm"
    evicts = True
