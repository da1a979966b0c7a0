"""Eviction metrics on a real `vllm serve`'s /metrics: arkvale on the bundled model, arkvale under
TP=2 (both ranks counted), and policy none (no plugin series, vLLM's own unchanged)."""
import concurrent.futures
import time

import pytest

from tests.engine.serving import running_server, scrape

pytestmark = pytest.mark.engine

BLOCK = 32
SCRAPE_DEADLINE_S = 30


def _value(families: dict, name: str, **labels) -> float:
    """The sample ``name`` (as exposed, e.g. ``..._total``) whose labels include ``labels``;
    summed over the samples that match."""
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    samples = [s for s in families.get(family, []) if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items())]
    assert samples, f"{name} {labels} not on /metrics"
    return sum(s.value for s in samples)


def _ranks(families: dict) -> set[str]:
    return {s.labels["rank"] for s in families["vllm:kvevict_pages_backed_up"]}


def _wait_until_drained(base: str) -> dict:
    """/metrics once every rank's host store is empty again (the workers free finished requests
    one step after the scheduler does)."""
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        families = scrape(base)
        used = [s.value for s in families.get("vllm:kvevict_host_store_used_bytes", [])]
        if used and not any(used):
            return families
        assert time.monotonic() < deadline, f"host store still in use: {used}"
        time.sleep(0.5)


def _complete_all(base: str, model: str, prompts: list[str], max_tokens: int) -> list:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: client.completions.create(
            model=model, prompt=p, max_tokens=max_tokens, temperature=0), prompts))


def _filled_pages(results) -> int:
    """Full pages whose KV was written: every token but the last sampled one has KV."""
    return sum((r.usage.prompt_tokens + r.usage.completion_tokens - 1) // BLOCK for r in results)


@pytest.fixture(scope="module")
def arkvale_server(model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("metrics") / "arkvale.log"
    with running_server(model_path, ["--max-model-len", "8192", "--enforce-eager",
                                     "--served-model-name", "smollm2", "--kv-eviction-policy",
                                     "arkvale", "--kv-budget", "512"], log) as base:
        yield base


def test_arkvale_series_match_what_happened(arkvale_server, model_path):
    from transformers import AutoTokenizer

    from vllm_kvevict.engine.metrics import METRIC_NAMES
    from vllm_kvevict.eval.passkey import found, make_trials

    base = arkvale_server
    assert not any(name.startswith("vllm:kvevict_") for name in scrape(base)), \
        "plugin series before the engine ran a step"
    trials = make_trials(AutoTokenizer.from_pretrained(model_path), 3000, 2, seed=3,
                         depths=[0.3, 0.6])
    results = _complete_all(base, "smollm2", [t.prompt for t in trials], max_tokens=8)
    assert all(found(t, r.choices[0].text) for t, r in zip(trials, results))

    families = _wait_until_drained(base)
    exposed = {s.name for samples in families.values() for s in samples}
    for name in METRIC_NAMES:
        assert name in exposed or f"{name}_count" in exposed, f"{name} missing"
    labels = {"model_name": "smollm2", "engine": "0", "rank": "0"}
    assert _ranks(families) == {"0"}
    assert _value(families, "vllm:kvevict_pages_backed_up_total", **labels) == \
        _filled_pages(results)
    assert _value(families, "vllm:kvevict_page_copies_recalled_total", **labels) > 0
    assert _value(families, "vllm:kvevict_page_copies_evicted_total", **labels) > 0
    assert _value(families, "vllm:kvevict_host_store_used_bytes", **labels) == 0
    capacity = _value(families, "vllm:kvevict_host_store_capacity_bytes", **labels)
    assert 0 <= 4 * 2**30 - capacity < 2**20  # --kv-host-space 4 GiB, whole pages
    assert _value(families, "vllm:kvevict_page_work_seconds_count", **labels) > 0
    assert _value(families, "vllm:kvevict_page_work_seconds_sum", **labels) > 0
    # Both requests select at every decode step after the first.
    assert _value(families, "vllm:kvevict_selections_per_step_sum", **labels) >= 2 * 6
    engine = {"model_name": "smollm2", "engine": "0"}
    assert _value(families, "vllm:kvevict_resident_blocks", **engine) == 0
    assert _value(families, "vllm:kvevict_budget_blocks", **engine) == 512 // BLOCK + 1
    for outcome in ("waited", "preempted"):
        assert _value(families, "vllm:kvevict_host_store_full_total", outcome=outcome,
                      **engine) == 0
    # vLLM's own series stay beside ours.
    assert _value(families, "vllm:prompt_tokens_total", **engine) == \
        sum(r.usage.prompt_tokens for r in results)


def test_tp2_counts_both_ranks(tiny_llama, tmp_path):
    prompts = [f"Item {i}: " + "alpha beta gamma delta " * (40 + 60 * i) for i in range(3)]
    args = ["--max-model-len", "2048", "--enforce-eager", "--served-model-name", "tiny",
            "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp",
            "--kv-eviction-policy", "arkvale", "--kv-budget", "128", "--kv-sink-tokens", "32",
            "--kv-window-tokens", "32"]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with running_server(tiny_llama, args, tmp_path / "tp2.log", env) as base:
        results = _complete_all(base, "tiny", prompts, max_tokens=24)
        families = _wait_until_drained(base)
    assert _ranks(families) == {"0", "1"}
    for rank in ("0", "1"):
        labels = {"model_name": "tiny", "engine": "0", "rank": rank}
        # Every rank backs up every page (its own KV heads of it) and recalls on its own.
        assert _value(families, "vllm:kvevict_pages_backed_up_total", **labels) == \
            _filled_pages(results)
        assert _value(families, "vllm:kvevict_page_copies_recalled_total", **labels) > 0
        assert _value(families, "vllm:kvevict_host_store_used_bytes", **labels) == 0
        assert _value(families, "vllm:kvevict_page_work_seconds_count", **labels) > 0


def test_none_exports_no_plugin_series_and_leaves_vllms_alone(tiny_llama, tmp_path):
    """Policy none with the plugin installed vs vLLM without any plugin: the same series."""
    prompt = "alpha beta gamma delta " * 50
    names = {}
    for name, args, env in [
            ("none", ["--kv-eviction-policy", "none"], {}),
            ("stock", [], {"VLLM_PLUGINS": "no-such-plugin"})]:
        with running_server(tiny_llama, ["--max-model-len", "2048", "--enforce-eager",
                                         "--served-model-name", "tiny", *args],
                            tmp_path / f"{name}.log", {"VLLM_CPU_KVCACHE_SPACE": "1", **env}) \
                as base:
            _complete_all(base, "tiny", [prompt], max_tokens=8)
            families = scrape(base)
        names[name] = {s.name for samples in families.values() for s in samples
                       if s.name.startswith("vllm:")}
    assert not any(n.startswith("vllm:kvevict_") for n in names["none"])
    assert names["none"] == names["stock"]
