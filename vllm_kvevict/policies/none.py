"""``none``: stock vLLM, every token stays resident and is attended over."""
import dataclasses

from vllm_kvevict.policies.base import EvictionPolicy


@dataclasses.dataclass(frozen=True)
class NoEviction(EvictionPolicy):
    """No eviction. The plugin registers nothing with vLLM, so behaviour is stock vLLM."""

    name = "none"
    evicts = False
