"""Eviction policies, registered by name (the values of ``--kv-eviction-policy``).

Adding a policy: write one module with a dataclass subclassing :class:`EvictionPolicy`, import it
here and add it to ``POLICY_REGISTRY``. The block manager and the attention backend read only the
policy's declared properties.
"""
from vllm_kvevict.policies.arkvale import ArkVale
from vllm_kvevict.policies.base import AttentionStatsPolicy, EvictionPolicy, PageSelectionPolicy
from vllm_kvevict.policies.h2o import H2O
from vllm_kvevict.policies.lfa import LFA
from vllm_kvevict.policies.lra import LRA
from vllm_kvevict.policies.none import NoEviction
from vllm_kvevict.policies.quest import Quest
from vllm_kvevict.policies.roco import RoCo
from vllm_kvevict.policies.snapkv import SnapKV
from vllm_kvevict.policies.streamingllm import StreamingLLM
from vllm_kvevict.policies.tova import TOVA

POLICY_REGISTRY: dict[str, EvictionPolicy] = {
    policy.name: policy for policy in (NoEviction(), StreamingLLM(), ArkVale(), Quest(), H2O(),
                                       TOVA(), RoCo(), SnapKV(), LRA(), LFA())
}

__all__ = ["ArkVale", "AttentionStatsPolicy", "EvictionPolicy", "H2O", "LFA", "LRA",
           "NoEviction", "PageSelectionPolicy", "POLICY_REGISTRY", "Quest", "RoCo", "SnapKV",
           "StreamingLLM", "TOVA", "get_policy"]


def get_policy(name: str) -> EvictionPolicy:
    return POLICY_REGISTRY[name]
