"""The policy interface shared by all eviction policies."""
from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
    """One eviction policy.

    A policy says which pages a request attends over once its prompt is processed. The
    mechanism (which blocks the scheduler frees, how the backend compacts block tables) lives in
    :mod:`vllm_kvevict.paging` and :mod:`vllm_kvevict.engine`; a policy never touches the pool.

    Attributes:
        name: the value of ``--kv-eviction-policy``.
        evicts: whether the policy caps resident blocks (``none`` does not).
    """

    name: ClassVar[str]
    evicts: ClassVar[bool] = True
