"""User-facing eviction settings and their validation.

The settings travel inside vLLM's own config as ``additional_config["kv_eviction"]`` (a plain dict,
so it pickles into every engine and worker process). The CLI flags, ``--additional-config`` and
the offline ``vllm.LLM(...)`` keyword arguments all end up there. Every process re-reads them with
:func:`EvictionConfig.from_vllm_config`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ADDITIONAL_CONFIG_KEY = "kv_eviction"

# Defaults follow ArkVale: pages of 32 tokens, two sink pages, two window pages.
DEFAULT_BUDGET_TOKENS = 1024
DEFAULT_SINK_TOKENS = 64
DEFAULT_WINDOW_TOKENS = 64
DEFAULT_EVICTING_BLOCK_SIZE = 32


class EvictionConfigError(ValueError):
    """Invalid eviction settings. The message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class EvictionConfig:
    """Eviction settings of one engine.

    Attributes:
        policy: registered policy name; ``none`` is stock vLLM.
        budget: resident KV tokens per request once its prompt is processed (per layer).
        sink_tokens: the first tokens of every request, never evicted.
        window_tokens: the most recent tokens, never evicted.
    """

    policy: str = "none"
    budget: int = DEFAULT_BUDGET_TOKENS
    sink_tokens: int = DEFAULT_SINK_TOKENS
    window_tokens: int = DEFAULT_WINDOW_TOKENS

    def __post_init__(self) -> None:
        from vllm_kvevict.policies import POLICY_REGISTRY

        if self.policy not in POLICY_REGISTRY:
            raise EvictionConfigError(
                f"unknown --kv-eviction-policy {self.policy!r}; "
                f"choose one of: {', '.join(sorted(POLICY_REGISTRY))}")
        for name in ("budget", "sink_tokens", "window_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EvictionConfigError(
                    f"--kv-{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.budget < self.sink_tokens + self.window_tokens:
            raise EvictionConfigError(
                f"--kv-budget {self.budget} is smaller than --kv-sink-tokens {self.sink_tokens} "
                f"+ --kv-window-tokens {self.window_tokens}")

    @property
    def evicts(self) -> bool:
        return self.policy != "none"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "EvictionConfig":
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EvictionConfigError(
                f"unknown kv_eviction setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}")
        values = {}
        for name, value in raw.items():
            if value is None:
                continue
            if name != "policy" and isinstance(value, str):
                try:
                    value = int(value)
                except ValueError:
                    raise EvictionConfigError(
                        f"--kv-{name.replace('_', '-')} must be a positive integer, "
                        f"got {value!r}") from None
            values[name] = value
        return cls(**values)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "EvictionConfig":
        return cls.from_dict((additional_config or {}).get(ADDITIONAL_CONFIG_KEY))

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "EvictionConfig":
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def layout(self, block_size: int) -> "PageLayout":
        """The page-granular view of this config for a cache of ``block_size`` tokens per block."""
        from vllm_kvevict.paging import PageLayout

        return PageLayout.from_tokens(block_size, self.budget, self.sink_tokens,
                                      self.window_tokens)
