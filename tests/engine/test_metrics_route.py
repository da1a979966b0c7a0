"""The metrics route's parts without an engine: step histograms, the engine core's polling, the
payload's trip through vLLM's msgpack, and the Prometheus exposition."""
import pytest

from vllm_kvevict.engine.metrics import (METRIC_NAMES, EngineMetricsSource, Histogram,
                                         StepMetrics)


def test_histogram_buckets_and_sum():
    histogram = Histogram((1, 4))
    for value in (0, 1, 2, 5, 9):
        histogram.observe(value)
    assert histogram.to_dict() == {"bounds": [1, 4], "counts": [2, 1, 2], "sum": 17.0}


def test_step_metrics_close_a_step_at_the_next_plan_or_a_read():
    metrics = StepMetrics()
    metrics.begin_step(0.001, 2)
    metrics.add_time(0.002)
    metrics.add_time(0.003)
    metrics.begin_step(0.5, 0)  # closes the first step
    assert metrics.page_work_seconds.counts[4] == 1  # 6 ms: the (5 ms, 10 ms] bucket
    assert metrics.selections_per_step.to_dict()["sum"] == 2
    metrics.flush()
    metrics.flush()  # nothing open: nothing observed
    assert sum(metrics.page_work_seconds.counts) == 2
    assert metrics.page_work_seconds.sum == pytest.approx(0.506)


class _Manager:
    class layout:
        max_resident_pages = 17

    def __init__(self):
        self.host_store_refusals = {"waited": 1, "preempted": 0}

    def num_resident_blocks_total(self):
        return 5


def _worker(rank, requests, used):
    return {"rank": rank, "requests": requests, "host_used_bytes": used}


def test_engine_polls_at_its_interval_and_while_draining():
    polls = []
    answers = iter([[_worker(1, 2, 10), _worker(0, 2, 10)],  # busy
                    [_worker(0, 0, 10), _worker(1, 0, 10)],  # finished, pages not yet freed
                    [_worker(0, 0, 0), _worker(1, 0, 0)]])   # freed

    def poll():
        polls.append(1)
        return next(answers)

    source = EngineMetricsSource(_Manager(), poll, interval_s=3600)
    first = source.payload(num_running=2)
    assert [w["rank"] for w in first["workers"]] == [0, 1]
    assert first["budget_blocks"] == 17 and first["resident_blocks"] == 5
    assert first["host_store_full"] == {"waited": 1, "preempted": 0}
    assert source.payload(num_running=2) is None  # not due, still running
    assert source.payload(num_running=0) is not None  # draining: asked every step...
    assert source.payload(num_running=0)["workers"][0]["host_used_bytes"] == 0
    assert source.payload(num_running=0) is None  # ...until the workers hold nothing
    assert len(polls) == 3


def test_payload_rides_vllms_msgpack_in_scheduler_stats():
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_kvevict.engine import metrics

    metrics.install()
    payload = {"budget_blocks": 17, "workers": [{"rank": 0, "page_work_seconds": {
        "bounds": [0.5], "counts": [1, 0], "sum": 0.25}}]}
    stats = SchedulerStats(num_running_reqs=3)
    setattr(stats, metrics.STATS_FIELD, payload)
    encoded = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(encoded).scheduler_stats
    assert getattr(decoded, metrics.STATS_FIELD) == payload
    assert decoded.num_running_reqs == 3
    assert getattr(SchedulerStats(), metrics.STATS_FIELD) is None


def test_collector_exposes_every_series_with_vllms_labels():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_kvevict.engine.metrics_export import EvictionCollector

    histogram = {"bounds": [0.5, 1.0], "counts": [2, 1, 1], "sum": 3.0}
    worker = {"rank": 1, "backed_up": 7, "evicted": 30, "recalled": 4, "requests": 0,
              "host_used_bytes": 0, "host_capacity_bytes": 1024,
              "page_work_seconds": histogram, "selections_per_step": histogram}
    collector = EvictionCollector("tiny")
    registry = CollectorRegistry()
    registry.register(collector)
    assert generate_latest(registry) == b""  # nothing before the first payload
    collector.latest[0] = {"budget_blocks": 17, "resident_blocks": 5,
                           "host_store_full": {"waited": 2, "preempted": 1}, "workers": [worker]}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for s in family.samples}
    names = {name for name, _ in samples}
    for name in METRIC_NAMES:
        assert name in names or f"{name}_count" in names, name
    rank = (("engine", "0"), ("model_name", "tiny"), ("rank", "1"))
    assert samples[("vllm:kvevict_pages_backed_up_total", rank)] == 7
    assert samples[("vllm:kvevict_page_copies_recalled_total", rank)] == 4
    bucket = tuple(sorted((*rank, ("le", "1.0"))))
    assert samples[("vllm:kvevict_page_work_seconds_bucket", bucket)] == 3
    assert samples[("vllm:kvevict_page_work_seconds_count", rank)] == 4
    engine = (("engine", "0"), ("model_name", "tiny"))
    assert samples[("vllm:kvevict_resident_blocks", engine)] == 5
    assert samples[("vllm:kvevict_host_store_full_total", (*engine, ("outcome", "preempted")))] \
        == 1
