"""Eviction metrics, gathered from every worker and carried to the API server's ``/metrics``.

The route through vLLM 0.32's process layout (API server -> engine core -> workers):

1. Workers: each page runtime keeps cumulative counters (:class:`~vllm_kvevict.pages.PageStats`),
   its host store, and a :class:`StepMetrics` (host time of page work and selecting requests per
   step), all in the worker process.
2. Engine core: the scheduler's ``make_stats`` calls :meth:`EngineMetricsSource.payload`, which
   asks every worker for its numbers with the executor's ``collective_rpc`` (mp and Ray alike, so
   every TP/PP rank is counted) at most every ``POLL_INTERVAL_S`` and on each step while the
   engine drains to idle, adds the scheduler's own (resident blocks, host-store refusals), and
   returns one plain dict.
3. The dict rides to the frontend in ``SchedulerStats.kvevict``, a field :func:`install` adds to
   vLLM's dataclass in every process, so vLLM's msgpack encoder carries it like the stock fields.
   :mod:`vllm_kvevict.engine.metrics_export` turns the latest dict into Prometheus series.

Why this route: a ``vllm.stat_logger_plugins`` entry point turns stats on even under
``--disable-log-stats`` and policy ``none``, and only sees what reaches the frontend; the worker
output of a step comes back from one rank only unless a KV connector is configured, and a KV
connector just for statistics would change scheduling. Polling costs one round trip to the
workers per interval and none per step.
"""
from __future__ import annotations

import bisect
import dataclasses
import time
from typing import Any, Callable

STATS_FIELD = "kvevict"
POLL_INTERVAL_S = 1.0

# Host seconds of page work per step, and requests that selected (or ranked) pages per step.
PAGE_WORK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5)
SELECTIONS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# The series on /metrics (:mod:`vllm_kvevict.engine.metrics_export`).
PREFIX = "vllm:kvevict_"
# name (without _total for counters) -> (type, help); order is the exposition order.
WORKER_SERIES = {
    "pages_backed_up": ("counter", "Pages copied to the host store (each page once, all layers)."),
    "page_copies_evicted": ("counter", "Page copies (one layer each) dropped from the KV cache."),
    "page_copies_recalled": ("counter", "Page copies (one layer each) recalled from the host "
                             "store."),
    "host_store_used_bytes": ("gauge", "Host memory holding backed-up pages."),
    "host_store_capacity_bytes": ("gauge", "Host memory of the page store (--kv-host-space)."),
    "page_work_seconds": ("histogram", "Host time of page work per step (plan and layers)."),
    "selections_per_step": ("histogram", "Requests whose pages were selected (or ranked for "
                            "eviction) per step."),
}
ENGINE_SERIES = {
    "resident_blocks": ("gauge", "KV-cache blocks held by running requests under eviction."),
    "budget_blocks": ("gauge", "Most blocks a request holds once its prompt is processed."),
    "host_store_full": ("counter", "Requests kept waiting (once each) or preemptions caused by a "
                        "full host store."),
}
WORKER_FIELDS = {"pages_backed_up": "backed_up", "page_copies_evicted": "evicted",
                 "page_copies_recalled": "recalled", "host_store_used_bytes": "host_used_bytes",
                 "host_store_capacity_bytes": "host_capacity_bytes"}


def exposed_name(name: str, kind: str) -> str:
    return PREFIX + name + ("_total" if kind == "counter" else "")


METRIC_NAMES = tuple(exposed_name(name, kind) for name, (kind, _) in
                     {**WORKER_SERIES, **ENGINE_SERIES}.items())


class Histogram:
    """Bucket counts (not cumulative; the last bucket is +Inf) and the sum of observations."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class StepMetrics:
    """A worker's per-step page-work histograms.

    A step opens at its plan (:meth:`begin_step`) and closes at the next one or when the numbers
    are read (:meth:`flush`); the layers add their host time in between (:meth:`add_time`).
    """

    def __init__(self) -> None:
        self.page_work_seconds = Histogram(PAGE_WORK_BUCKETS_S)
        self.selections_per_step = Histogram(SELECTIONS_BUCKETS)
        self._open = False
        self._seconds = 0.0
        self._selections = 0

    def begin_step(self, plan_seconds: float, selections: int) -> None:
        self.flush()
        self._open, self._seconds, self._selections = True, plan_seconds, selections

    def add_time(self, seconds: float) -> None:
        self._seconds += seconds

    def flush(self) -> None:
        if self._open:
            self.page_work_seconds.observe(self._seconds)
            self.selections_per_step.observe(self._selections)
            self._open = False


def worker_page_stats(worker=None) -> dict[str, Any] | None:
    """This worker's numbers (run on every worker through ``collective_rpc``); None without a
    page runtime (policy ``none``, or a pipeline stage that has none)."""
    from vllm_kvevict.engine import page_runtime

    runtime = page_runtime.current_runtime()
    if runtime is None:
        return None
    stats = runtime.stats  # folds the device-side copy counts: one read per poll
    store = runtime.store
    metrics = runtime.step_metrics
    metrics.flush()
    return {"rank": _global_rank(), "backed_up": stats.backed_up, "evicted": stats.evicted,
            "recalled": stats.recalled, "requests": len(runtime.requests),
            "host_used_bytes": store.used_bytes,
            "host_capacity_bytes": store.num_pages * store.page_bytes,
            "page_work_seconds": metrics.page_work_seconds.to_dict(),
            "selections_per_step": metrics.selections_per_step.to_dict()}


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EngineMetricsSource:
    """The engine core's side: the payload of ``SchedulerStats.kvevict``.

    ``poll_workers()`` returns one :func:`worker_page_stats` result per worker. Workers are asked
    at most every ``interval_s``, and on every step while nothing runs but a worker still held
    requests or host pages at the last poll: finished requests are released by the workers one
    step after the scheduler frees them, and the engine stops stepping once they are.
    """

    def __init__(self, manager, poll_workers: Callable[[], list],
                 interval_s: float = POLL_INTERVAL_S):
        self.manager = manager
        self.poll_workers = poll_workers
        self.interval_s = interval_s
        self._last_poll: float | None = None
        self._workers_busy = False

    def payload(self, num_running: int) -> dict[str, Any] | None:
        now = time.monotonic()
        due = self._last_poll is None or now - self._last_poll >= self.interval_s
        draining = num_running == 0 and self._workers_busy
        if not (due or draining):
            return None
        self._last_poll = now
        workers = [w for w in self.poll_workers() if w is not None]
        self._workers_busy = any(w["requests"] or w["host_used_bytes"] for w in workers)
        manager = self.manager
        return {"budget_blocks": manager.layout.max_resident_pages,
                "resident_blocks": manager.num_resident_blocks_total(),
                "host_store_full": dict(manager.host_store_refusals),
                "workers": sorted(workers, key=lambda w: w["rank"])}


def install() -> None:
    """Add the ``kvevict`` field to vLLM's ``SchedulerStats`` (in every process, before any stats
    are encoded) and hook the engine core and its scheduler. Idempotent."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_kvevict.engine.patching import wrap_method

    if STATS_FIELD not in SchedulerStats.__dataclass_fields__:
        field = dataclasses.field(default=None)
        field.name, field.type = STATS_FIELD, "dict[str, Any] | None"
        field._field_type = dataclasses._FIELD  # a regular field, as the decorator would make it
        SchedulerStats.__dataclass_fields__[STATS_FIELD] = field
        SchedulerStats.__annotations__[STATS_FIELD] = dict[str, Any] | None
        setattr(SchedulerStats, STATS_FIELD, None)
    # The first method ``EngineCore.__init__`` calls once both the executor and the scheduler
    # exist (the engine core process loads plugins inside ``__init__``, too late to wrap it).
    wrap_method(EngineCore, "_initialize_effective_attention_block_size", _attach_source)
    wrap_method(Scheduler, "make_stats", _make_stats)


def _attach_source(original, core, *args, **kwargs):
    result = original(core, *args, **kwargs)
    from vllm_kvevict.engine.kv_manager import EvictingAttentionManager

    scheduler = getattr(core, "scheduler", None)
    if scheduler is None or not getattr(scheduler, "log_stats", False):
        return result
    coordinator = scheduler.kv_cache_manager.coordinator
    managers = [m for m in coordinator.single_type_managers
                if isinstance(m, EvictingAttentionManager)]
    if managers:
        executor = core.model_executor
        scheduler._kvevict_metrics = EngineMetricsSource(
            managers[0], lambda: executor.collective_rpc(worker_page_stats))
    return result


def _make_stats(original, scheduler, *args, **kwargs):
    stats = original(scheduler, *args, **kwargs)
    source = getattr(scheduler, "_kvevict_metrics", None)
    if stats is not None and source is not None:
        setattr(stats, STATS_FIELD, source.payload(stats.num_running_reqs))
    return stats
