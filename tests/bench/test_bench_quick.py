"""Smoke test: every benchmark runs end to end in --quick mode and writes JSON, markdown, PNG."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

NAMES = ["passkey", "policies", "retrieval", "reference", "perplexity", "latency", "recall",
         "throughput", "throughput-decode", "prefix"]


def test_all_benchmarks_quick(tmp_path, model_path):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    result = subprocess.run([sys.executable, "-m", "vllm_kvevict.bench", "all", "--quick",
                             "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in NAMES:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["environment"]["vllm"] and payload["environment"]["machine"]
        table = (tmp_path / f"{name}.md").read_text()
        assert "| none" in table or name in ("recall", "reference", "prefix")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    latency = json.loads((tmp_path / "latency.json").read_text())["results"]
    assert [(r["policy"], r["prompt_tokens"]) for r in latency] == [
        ("none", 800), ("streamingllm", 800), ("arkvale", 800), ("none", 256), ("arkvale", 800)]
    assert all(r["steps"] >= 10 and r["median_ms"] > 0 for r in latency)
    assert latency[2]["ratio_to_streamingllm"] == latency[2]["median_ms"] / latency[1]["median_ms"]
    throughput = json.loads((tmp_path / "throughput.json").read_text())["results"]
    assert [r["policy"] for r in throughput] == ["none", "arkvale"]
    assert all(r["output_tokens"] == 4 * 16 for r in throughput)
    decode_runs = json.loads((tmp_path / "throughput-decode.json").read_text())
    decode = decode_runs["results"]  # medians of two rounds
    assert [r["policy"] for r in decode] == ["none", "streamingllm", "arkvale"]
    assert all(r["output_tokens"] == 4 * 24 and r["mean_itl_ms"] > 0 and r["decode_tok_s"] > 0
               for r in decode)
    assert len(decode_runs["rounds"]) == 2
    # The server's page work per step: arkvale's, none for policies without page work.
    assert [r.get("page_work_ms") for r in decode[:2]] == [None, None]
    assert decode[2]["page_work_ms"] > 0
    assert [r.get("recalls_per_step") for r in decode[:2]] == [None, None]
    assert decode[2]["recalls_per_step"] >= 0
    assert throughput[0]["page_work_ms"] is None and throughput[1]["page_work_ms"] > 0
    low, high = decode[2]["tok_s_vs_streamingllm_range"]
    assert low <= decode[2]["tok_s_vs_streamingllm"] <= high
    assert {low, high} == {run[2]["tok_s_vs_streamingllm"] for run in decode_runs["rounds"]}
    policies = json.loads((tmp_path / "policies.json").read_text())["cells"]
    assert [c["policy"] for c in policies] == ["none", "h2o", "tova", "roco", "snapkv"]
    prefix = json.loads((tmp_path / "prefix.json").read_text())
    assert [r["policy"] for r in prefix["results"]] == ["lru", "marconi"]
    for r in prefix["results"]:
        assert 0 < r["token_hit_rate"] < 1 and r["ttft_p95_ms"] >= r["ttft_p50_ms"] > 0
        assert r["prefill_tokens_computed"] == r["prompt_tokens"] - r["cached_prompt_tokens"] > 0
    assert [a["pool"] for a in prefix["allocation"]] == ["lru", "marconi", "marconi:1.0"]
    assert all(a["us_per_call"] > 0 for a in prefix["allocation"])
    retrieval = json.loads((tmp_path / "retrieval.json").read_text())
    cells = retrieval["cells"]
    assert [(c["policy"], c["task"]) for c in cells] == [
        (p, t) for p in ("none", "streamingllm", "arkvale") for t in retrieval["settings"]["tasks"]]
    assert len(cells) == 3 * 4 and all(len(c["found"]) == len(c["completions"]) == 1 for c in cells)
    assert all(abs(n - 800) <= 40 for c in cells for n in c["tokens"])
    none = [c for c in cells if c["policy"] == "none"]
    assert [c["found"] for c in none if c["task"].startswith("needle")] == [[True], [True]]
    perplexity = json.loads((tmp_path / "perplexity.json").read_text())["results"]
    assert all(1 < r["perplexity"] < 1000 for r in perplexity)


def test_unknown_setting_is_refused():
    result = subprocess.run([sys.executable, "-m", "vllm_kvevict.bench", "latency", "--set",
                             "trails=3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "latency has no setting 'trails'" in result.stderr
