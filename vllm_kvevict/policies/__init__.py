"""Eviction policies, registered by name (the values of ``--kv-eviction-policy``).

Adding a policy: write one module with a dataclass subclassing :class:`EvictionPolicy`, import it
here and add it to ``POLICY_REGISTRY``. The block manager and the attention backend read only the
policy's declared properties.
"""
from vllm_kvevict.policies.arkvale import ArkVale
from vllm_kvevict.policies.base import EvictionPolicy, PageSelectionPolicy
from vllm_kvevict.policies.none import NoEviction
from vllm_kvevict.policies.quest import Quest
from vllm_kvevict.policies.streamingllm import StreamingLLM

POLICY_REGISTRY: dict[str, EvictionPolicy] = {
    policy.name: policy for policy in (NoEviction(), StreamingLLM(), ArkVale(), Quest())
}

__all__ = ["ArkVale", "EvictionPolicy", "NoEviction", "PageSelectionPolicy", "POLICY_REGISTRY", "Quest",
           "StreamingLLM", "get_policy"]


def get_policy(name: str) -> EvictionPolicy:
    return POLICY_REGISTRY[name]
