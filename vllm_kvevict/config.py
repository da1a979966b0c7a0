"""User-facing eviction settings and their validation.

The settings travel inside vLLM's own config as ``additional_config["kv_eviction"]`` (a plain dict,
so it pickles into every engine and worker process). The CLI flags, ``--additional-config`` and
the offline ``vllm.LLM(...)`` keyword arguments all end up there. Every process re-reads them with
:func:`EvictionConfig.from_vllm_config`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from vllm_kvevict.paging import PageLayout

ADDITIONAL_CONFIG_KEY = "kv_eviction"

# Defaults follow ArkVale: pages of 32 tokens, two sink pages, two window pages.
DEFAULT_BUDGET_TOKENS = 1024
DEFAULT_SINK_TOKENS = 64
DEFAULT_WINDOW_TOKENS = 64
DEFAULT_EVICTING_BLOCK_SIZE = 32
DEFAULT_HOST_SPACE_GIB = 4.0
# ArkVale's top-k rule: min(40 pages of 32, budget / 2) tokens. With anchors (arkvale without
# sparse attention) top-k takes 3/8 of the budget and anchors the rest (docs/bench retrieval).
MAX_DEFAULT_TOP_K_TOKENS = 1280
DEFAULT_TOP_K_SHARE = 1 / 2
ANCHORED_TOP_K_SHARE = 3 / 8
DIGEST_KINDS = ("cuboid-mean", "cuboid-max")
# SnapKV's observation window: the last 32 prompt queries.
DEFAULT_OBSERVATION_WINDOW = 32


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
        top_k_tokens: (selecting policies) tokens chosen per step by score besides sinks and
            window; ``None``: ``min(1280, budget / 2)``, or ``min(1280, 3 * budget / 8)`` where
            arkvale keeps anchors (it fills the rest with them, see ``observation_window``),
            capped to what the budget leaves.
        host_space_gib: (recalling policies) host memory per worker for page backups, GiB.
        sparse_attention: (selecting policies) attend only over sinks + top-k + window instead
            of every resident page.
        digest: (digest policies) ``cuboid-mean`` (ArkVale) or ``cuboid-max`` (Quest's min/max).
        observation_window: (attention-statistics policies) the last prompt queries whose
            attention seeds the statistics when a prompt ends (SnapKV's window); (arkvale)
            the queries whose exact attention chooses the anchors, the prompt pages kept for
            the request's life in the budget left besides sinks, window and top-k.
        recent_ratio: share of the budget held as the recent window; ``None``: ``window_tokens``
            alone. The window is the larger of the two.
        per_head_selection: (arkvale) each KV head selects its own pages, and each head's
            slice of a block holds the page that head selected; ``None``: on unless
            ``sparse_attention`` (one block table serves every head there).
    """

    policy: str = "none"
    budget: int = DEFAULT_BUDGET_TOKENS
    sink_tokens: int = DEFAULT_SINK_TOKENS
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    top_k_tokens: int | None = None
    host_space_gib: float = DEFAULT_HOST_SPACE_GIB
    sparse_attention: bool = False
    digest: str = "cuboid-mean"
    observation_window: int = DEFAULT_OBSERVATION_WINDOW
    recent_ratio: float | None = None
    per_head_selection: bool | None = None

    def __post_init__(self) -> None:
        from vllm_kvevict.policies import POLICY_REGISTRY

        if self.policy not in POLICY_REGISTRY:
            raise EvictionConfigError(
                f"unknown --kv-eviction-policy {self.policy!r}; "
                f"choose one of: {', '.join(sorted(POLICY_REGISTRY))}")
        for name in ("budget", "sink_tokens", "window_tokens", "top_k_tokens",
                     "observation_window"):
            value = getattr(self, name)
            if name == "top_k_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EvictionConfigError(
                    f"{_flag(name)} must be a positive integer, got {value!r}")
        host = self.host_space_gib
        if isinstance(host, bool) or not isinstance(host, (int, float)) or not host > 0:
            raise EvictionConfigError(f"--kv-host-space must be a positive number of GiB, "
                                      f"got {host!r}")
        for name in ("sparse_attention", "per_head_selection"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "per_head_selection"
                                                    and value is None):
                raise EvictionConfigError(f"{_flag(name)} must be true or false, got {value!r}")
        if self.per_head_selection and self.sparse_attention:
            raise EvictionConfigError("--kv-per-head-selection needs attention over every "
                                      "resident page; drop --kv-sparse-attention or pass "
                                      "--no-kv-per-head-selection")
        ratio = self.recent_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 < ratio < 1):
            raise EvictionConfigError(f"--kv-recent-ratio must be a number between 0 and 1 "
                                      f"(exclusive), got {ratio!r}")
        if self.digest not in DIGEST_KINDS:
            raise EvictionConfigError(f"unknown --kv-digest {self.digest!r}; choose one of: "
                                      f"{', '.join(DIGEST_KINDS)}")
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
            if isinstance(value, str):
                value = _parse_string(name, value)
            values[name] = value
        return cls(**values)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None
                               ) -> "EvictionConfig":
        return cls.from_dict((additional_config or {}).get(ADDITIONAL_CONFIG_KEY))

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "EvictionConfig":
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))

    @property
    def selects_per_head(self) -> bool:
        """Whether selecting policies place pages per KV head (``per_head_selection``
        resolved)."""
        if self.per_head_selection is None:
            return not self.sparse_attention
        return self.per_head_selection

    @property
    def host_space_bytes(self) -> int:
        return int(self.host_space_gib * (1 << 30))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def layout(self, block_size: int) -> "PageLayout":
        """The page-granular view of this config for a cache of ``block_size`` tokens per block."""
        from vllm_kvevict.paging import PageLayout

        share = ANCHORED_TOP_K_SHARE if self.keeps_anchors else DEFAULT_TOP_K_SHARE
        return PageLayout.from_tokens(block_size, self.budget, self.sink_tokens,
                                      self.recent_window_tokens, self.top_k_tokens, share)

    @property
    def keeps_anchors(self) -> bool:
        """Whether the policy keeps anchors (prompt pages chosen by the last prompt queries'
        exact attention) in the budget left besides sinks, window and top-k."""
        from vllm_kvevict.policies import POLICY_REGISTRY
        from vllm_kvevict.policies.base import PageSelectionPolicy

        policy = POLICY_REGISTRY[self.policy]
        return (isinstance(policy, PageSelectionPolicy)
                and policy.keeps_anchors(self.sparse_attention, self.observation_window))

    @property
    def recent_window_tokens(self) -> int:
        if self.recent_ratio is None:
            return self.window_tokens
        return max(self.window_tokens, int(self.recent_ratio * self.budget))


_FLAG_NAMES = {"policy": "--kv-eviction-policy", "host_space_gib": "--kv-host-space"}


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--kv-" + name.replace("_", "-"))


def _parse_string(name: str, value: str) -> Any:
    """A setting given as text (``--additional-config.kv_eviction.<name> VALUE``)."""
    if name in ("policy", "digest"):
        return value
    if name in ("sparse_attention", "per_head_selection"):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise EvictionConfigError(f"{_flag(name)} must be true or false, got {value!r}")
    try:
        return float(value) if name in ("host_space_gib", "recent_ratio") else int(value)
    except ValueError:
        kind = {"host_space_gib": "a positive number of GiB",
                "recent_ratio": "a number between 0 and 1 (exclusive)"}.get(name,
                                                                           "a positive integer")
        raise EvictionConfigError(f"{_flag(name)} must be {kind}, got {value!r}") from None
