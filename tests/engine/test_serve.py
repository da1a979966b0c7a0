"""A real `vllm serve` with the plugin on 127.0.0.1, driven through the OpenAI client."""
import time

import pytest

from tests.engine.serving import running_server

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """One server per module: arkvale at a 512-token budget."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(model_path, ["--max-model-len", "8192", "--enforce-eager",
                                     "--served-model-name", "smollm2", "--kv-eviction-policy",
                                     "arkvale", "--kv-budget", "512"], log_path) as base:
        yield base, log_path


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused")


def test_server_runs_the_plugin(server):
    log = server[1].read_text()
    assert "vllm-kvevict: policy arkvale, budget 512 tokens = 16 blocks of 32" in log
    assert "vllm-kvevict: budget 16 blocks of 32 tokens (2 sink blocks)" in log


def test_completions_streaming_and_not(client):
    kwargs = dict(model="smollm2", prompt="The capital of France is", max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs)
    text = full.choices[0].text
    assert text.strip()
    chunks = client.completions.create(stream=True, **kwargs)
    streamed = "".join(chunk.choices[0].text for chunk in chunks)
    assert streamed == text


def test_chat_completions_streaming_and_not(client):
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Name three colours."}],
                  max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs)
    text = full.choices[0].message.content
    assert text.strip()
    chunks = client.chat.completions.create(stream=True, **kwargs)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == text


def test_long_prompt_past_the_budget_is_served(client):
    from vllm_kvevict.eval.passkey import FILLER

    prompt = FILLER * 120 + "Repeat the first sentence:"
    result = client.completions.create(model="smollm2", prompt=prompt, max_tokens=64, temperature=0)
    assert result.usage.prompt_tokens > 1024
    assert result.usage.completion_tokens == 64 or result.choices[0].finish_reason == "stop"


def test_passkey_recalled_through_the_server(client, server, model_path):
    """A key in the middle of a ~4k-token prompt, beyond the budget: found through the
    server (its page kept as an anchor or recalled by digest)."""
    from transformers import AutoTokenizer

    from vllm_kvevict.eval.passkey import found, make_trials

    trial = make_trials(AutoTokenizer.from_pretrained(model_path), 4000, 1, seed=0,
                        depths=[0.5])[0]
    result = client.completions.create(model="smollm2", prompt=trial.prompt, max_tokens=8,
                                       temperature=0)
    assert found(trial, result.choices[0].text), result.choices[0].text
    deadline = time.monotonic() + 30
    while "vllm-kvevict: host store" not in server[1].read_text():
        assert time.monotonic() < deadline, "no page statistics line in the server log"
        time.sleep(1)
    assert ("vllm-kvevict: arkvale keeps up to 16 pages per step and layer (2 sink, 2 window, "
            "6 anchored by the last 32 prompt queries, top-6; chosen per KV head)"
            ) in server[1].read_text()


@pytest.mark.parametrize("body, message", [
    ({"prompt": "FILLER", "max_tokens": 8}, "maximum context length"),
    ({"prompt": "Hi", "max_tokens": 4, "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "max_tokens": 4, "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 4, "n": 0}, "n"),
])
def test_bad_input_gets_a_4xx_and_leaves_the_server_healthy(server, body, message):
    """vLLM's own validation answers bad requests under the plugin (a prompt past
    --max-model-len included: the plugin's start-up check already made every prompt that fits
    --max-model-len fit the KV pool under full prefill)."""
    import requests

    from vllm_kvevict.eval.passkey import FILLER

    base = server[0]
    if body["prompt"] == "FILLER":
        body = dict(body, prompt=FILLER * 400)  # well past 8192 tokens
    reply = requests.post(f"{base}/v1/completions", json={"model": "smollm2", **body}, timeout=120)
    assert 400 <= reply.status_code < 500, reply.text[:300]
    error = reply.json()["error"]
    assert message in error["message"], error
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    ok = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
