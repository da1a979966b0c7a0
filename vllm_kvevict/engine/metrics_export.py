"""The frontend's side of the eviction metrics: Prometheus series on the API server's ``/metrics``.

:class:`EvictionStatLogger` joins vLLM's stat loggers (``StatLoggerManager``) when an evicting
policy runs with stats on (``--disable-log-stats`` and policy ``none`` leave vLLM's loggers as
they are). It keeps
the latest :mod:`vllm_kvevict.engine.metrics` payload of each engine; a collector registered in
prometheus_client's default registry (the one vLLM's ``/metrics`` serves with one API server)
turns it into series at scrape time. Labels follow vLLM's (``model_name``, ``engine``); the
workers' series add ``rank``, the worker's global rank.
"""
from __future__ import annotations

from typing import Any, Iterator

from vllm_kvevict.engine.metrics import (ENGINE_SERIES, PREFIX, STATS_FIELD, WORKER_FIELDS,
                                         WORKER_SERIES)


class EvictionCollector:
    """Yields the series of the latest payload per engine (nothing before the first one)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.latest: dict[int, dict[str, Any]] = {}

    def describe(self):
        return []  # names are not fixed at registration; vLLM's re-registration leaves us alone

    def collect(self) -> Iterator:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        if not self.latest:
            return
        family_cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                      "histogram": HistogramMetricFamily}
        for name, (kind, help_text) in WORKER_SERIES.items():
            family = family_cls[kind](PREFIX + name, help_text,
                                      labels=["model_name", "engine", "rank"])
            for engine, payload in sorted(self.latest.items()):
                for worker in payload["workers"]:
                    labels = [self.model_name, str(engine), str(worker["rank"])]
                    if kind == "histogram":
                        buckets, total = _cumulative(worker[name])
                        family.add_metric(labels, buckets, total)
                    else:
                        family.add_metric(labels, worker[WORKER_FIELDS[name]])
            yield family
        for name, (kind, help_text) in ENGINE_SERIES.items():
            extra = ["outcome"] if name == "host_store_full" else []
            family = family_cls[kind](PREFIX + name, help_text,
                                      labels=["model_name", "engine", *extra])
            for engine, payload in sorted(self.latest.items()):
                labels = [self.model_name, str(engine)]
                if extra:
                    for outcome, count in sorted(payload[name].items()):
                        family.add_metric(labels + [outcome], count)
                else:
                    family.add_metric(labels, payload[name])
            yield family


def _cumulative(histogram: dict[str, Any]) -> tuple[list[tuple[str, int]], float]:
    buckets, running = [], 0
    for bound, count in zip([*histogram["bounds"], float("inf")], histogram["counts"]):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return buckets, histogram["sum"]


_collector: EvictionCollector | None = None


def _register(model_name: str) -> EvictionCollector:
    """One collector per process (a new engine replaces the previous one's)."""
    from prometheus_client import REGISTRY

    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = EvictionCollector(model_name)
    REGISTRY.register(_collector)
    return _collector


def _stat_logger_base():
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    return AggregateStatLoggerBase


class EvictionStatLogger(_stat_logger_base()):
    """Keeps the payloads that arrive with the scheduler stats; the collector exports them."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        self.collector = _register(vllm_config.model_config.served_model_name)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        payload = getattr(scheduler_stats, STATS_FIELD, None)
        if payload is not None:
            self.collector.latest[engine_idx] = payload

    def log_engine_initialized(self) -> None:
        pass


def install() -> None:
    """Add :class:`EvictionStatLogger` to vLLM's stat loggers when an evicting policy runs with
    stats on. Idempotent."""
    from vllm.v1.metrics.loggers import StatLoggerManager

    from vllm_kvevict.engine.patching import wrap_method

    wrap_method(StatLoggerManager, "__init__", _stat_logger_manager_init)


def _stat_logger_manager_init(original, manager, vllm_config, *args, **kwargs):
    import inspect

    from vllm_kvevict.config import EvictionConfig

    bound = inspect.signature(original).bind(manager, vllm_config, *args, **kwargs)
    bound.apply_defaults()
    if (bound.arguments["enable_default_loggers"]
            and EvictionConfig.from_vllm_config(vllm_config).evicts):
        loggers = list(bound.arguments["custom_stat_loggers"] or [])
        if EvictionStatLogger not in loggers:
            bound.arguments["custom_stat_loggers"] = [*loggers, EvictionStatLogger]
    return original(*bound.args, **bound.kwargs)
