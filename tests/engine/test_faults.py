"""Injected faults in the page work (``VLLM_KVEVICT_FAULT``): off by default, exact when on, and
through HTTP the engine dies loudly (error responses, unhealthy, the server exits)."""
import time

import pytest

from vllm_kvevict.engine.faults import FAULT_ENV, InjectedFault, install_fault, parse_fault


class FakeRuntime:
    """The methods the fault points wrap, recording their calls."""
    recalls = True

    def __init__(self):
        self.calls = []

    def before_attention(self, layer, query, kv_cache, plan):
        self.calls.append(("before", layer))

    def _select(self, layer, query, kv_cache, batch, from_host):
        self.calls.append(("select", layer, from_host))


class Plan:
    def __init__(self, num_backups):
        import torch

        self.backup_blocks = torch.arange(num_backups)


def test_parse_fault():
    assert parse_fault(None) is None and parse_fault("") is None
    assert parse_fault("backup") == ("backup", 0)
    assert parse_fault("recall:3") == ("recall", 3)
    for bad in ("recal", "recall:x", "scoring:-1"):
        with pytest.raises(ValueError, match=FAULT_ENV):
            parse_fault(bad)


def test_no_fault_wraps_nothing(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    runtime = FakeRuntime()
    install_fault(runtime)
    assert vars(runtime) == {"calls": []}  # the class's methods, untouched: no per-call cost


def test_recall_fault_fires_on_host_selection_after_n(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "recall:2")
    runtime = FakeRuntime()
    install_fault(runtime)
    runtime._select(0, None, None, None, from_host=False)  # prefill-end selection: no recall
    runtime._select(0, None, None, None, from_host=True)
    runtime._select(1, None, None, None, from_host=True)
    with pytest.raises(InjectedFault, match="recall"):
        runtime._select(2, None, None, None, from_host=True)
    assert runtime.calls == [("select", 0, False), ("select", 0, True), ("select", 1, True)]


def test_scoring_fault_fires_on_every_selection(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "scoring:1")
    runtime = FakeRuntime()
    install_fault(runtime)
    runtime._select(0, None, None, None, from_host=False)  # as PageRuntime calls it
    with pytest.raises(InjectedFault, match="scoring"):
        runtime._select(1, None, None, None, from_host=True)
    runtime.before_attention(0, None, None, Plan(2))  # other points unwrapped
    assert runtime.calls == [("select", 0, False), ("before", 0)]


def test_backup_fault_fires_only_with_pages_to_back_up(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "backup")
    runtime = FakeRuntime()
    install_fault(runtime)
    runtime.before_attention(0, None, None, Plan(0))
    with pytest.raises(InjectedFault, match="backup"):
        runtime.before_attention(1, None, None, Plan(3))
    assert runtime.calls == [("before", 0)]


def test_scoring_fault_on_the_statistics_runtime(monkeypatch):
    from vllm_kvevict.attention_pages import AttentionStatsRuntime

    monkeypatch.setenv(FAULT_ENV, "scoring")
    runtime = AttentionStatsRuntime.__new__(AttentionStatsRuntime)
    install_fault(runtime)
    with pytest.raises(InjectedFault, match="scoring"):
        runtime._observe(0, None, None, None)
    monkeypatch.setenv(FAULT_ENV, "recall")  # no recall under attention statistics
    other = AttentionStatsRuntime.__new__(AttentionStatsRuntime)
    install_fault(other)
    assert vars(other) == {}


@pytest.mark.engine
@pytest.mark.parametrize("policy, point", [("arkvale", "backup"), ("arkvale", "scoring"),
                                           ("arkvale", "recall"), ("h2o", "scoring")])
def test_fault_kills_the_engine_loudly_through_http(model_path, tmp_path, policy, point):
    """Documented behaviour (README, "Reliability"): the request in flight gets a 5xx error, no
    completion text; the server turns unhealthy and exits; the log names the fault."""
    import requests

    from vllm_kvevict.bench.common import start_server, stop_server
    from vllm_kvevict.eval.passkey import FILLER

    log = tmp_path / "server.log"
    process, base = start_server(
        model_path, ["--max-model-len", "2048", "--enforce-eager", "--block-size", "32",
                     "--kv-eviction-policy", policy, "--kv-budget", "256"], log,
        env={FAULT_ENV: point}, timeout_s=300)
    try:
        if point == "recall":  # within the budget: nothing evicted, nothing recalled
            short = requests.post(f"{base}/v1/completions", timeout=120, json={
                "model": "m", "prompt": "Hello", "max_tokens": 4})
            assert short.status_code == 200
        reply = requests.post(f"{base}/v1/completions", timeout=120, json={
            "model": "m", "prompt": FILLER * 20, "max_tokens": 8})
        assert reply.status_code >= 500, reply.text[:500]
        assert "choices" not in reply.json()
        deadline = time.monotonic() + 90
        while process.poll() is None:
            assert time.monotonic() < deadline, "the server kept running after the engine died"
            try:
                assert requests.get(f"{base}/health", timeout=5).status_code != 200
            except requests.ConnectionError:
                pass
            time.sleep(1)
        text = log.read_text()
        assert "InjectedFault" in text and f"injected {point} fault" in text
    finally:
        stop_server(process)
