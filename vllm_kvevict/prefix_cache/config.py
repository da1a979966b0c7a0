"""Prefix-cache eviction settings: ``additional_config["prefix_cache"]``.

Set by ``--prefix-cache-eviction-policy`` / ``--prefix-cache-alpha`` /
``--prefix-cache-tune-window``, by ``--additional-config.prefix_cache.<key>`` (also in a
``--config`` YAML file) or by ``LLM(..., prefix_cache_eviction_policy=...)``. Policy ``lru`` (the
default) is stock vLLM: the entry is dropped and nothing is installed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from vllm_kvevict.config import EvictionConfigError
from vllm_kvevict.prefix_cache.tuning import DEFAULT_TUNE_WINDOW

PREFIX_CACHE_KEY = "prefix_cache"
PREFIX_CACHE_POLICIES = ("lru", "marconi")


@dataclasses.dataclass(frozen=True)
class PrefixCacheConfig:
    """Attributes:
        eviction_policy: ``lru`` (vLLM's own order) or ``marconi``.
        alpha: marconi's fixed weight of FLOPs per byte against recency; ``None``: tuned online.
        tune_window: requests per tuning window (replayed over the alpha grid when it fills).
    """

    eviction_policy: str = "lru"
    alpha: float | None = None
    tune_window: int = DEFAULT_TUNE_WINDOW

    def __post_init__(self) -> None:
        if self.eviction_policy not in PREFIX_CACHE_POLICIES:
            raise EvictionConfigError(
                f"unknown --prefix-cache-eviction-policy {self.eviction_policy!r}; choose one "
                f"of: {', '.join(PREFIX_CACHE_POLICIES)}")
        alpha = self.alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not alpha >= 0):
            raise EvictionConfigError(f"--prefix-cache-alpha must be a number >= 0, got "
                                      f"{alpha!r}")
        window = self.tune_window
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise EvictionConfigError(f"--prefix-cache-tune-window must be a positive integer, "
                                      f"got {window!r}")
        if self.eviction_policy == "lru" and (alpha is not None
                                              or window != DEFAULT_TUNE_WINDOW):
            raise EvictionConfigError("--prefix-cache-alpha and --prefix-cache-tune-window "
                                      "apply to --prefix-cache-eviction-policy marconi only")

    @property
    def is_stock(self) -> bool:
        return self.eviction_policy == "lru"

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None
                               ) -> "PrefixCacheConfig":
        raw = (additional_config or {}).get(PREFIX_CACHE_KEY)
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise EvictionConfigError(
                f"--additional-config.{PREFIX_CACHE_KEY} must be a mapping, got {raw!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EvictionConfigError(f"unknown prefix_cache setting(s) {', '.join(unknown)}; "
                                      f"known: {', '.join(sorted(known))}")
        values = {}
        for name, value in raw.items():
            if value is None:
                continue
            if isinstance(value, str) and name != "eviction_policy":
                try:
                    value = (float if name == "alpha" else int)(value)
                except ValueError:
                    pass  # refused with its flag's message by __post_init__
            values[name] = value
        return cls(**values)
