"""Batch throughput at equal KV memory through a real ``vllm serve`` and the OpenAI client.

Every policy gets the same KV pool (``--num-gpu-blocks-override`` blocks of 32 tokens, so the
comparison does not depend on how the platform sizes the cache) and the same load: N concurrent
streamed completions of ``max_tokens`` tokens each (``ignore_eos``). Two workloads use it:
``throughput`` (long prompts, short answers: prefill-heavy) and ``throughput-decode`` (short
prompts, long answers, as reasoning traffic: decode-heavy). Reported: the most requests running
at once (polled from the server's Prometheus ``/metrics``), output tokens/s and total time, each
as a ratio to ``none`` from the same run; and, apart from prefill, the decode phase: the mean
inter-token latency (time between a request's streamed tokens after its first) and decode
tokens/s (tokens after each request's first, over the time at least one request was decoding).

Prompts are passkey prompts, whose filler is shared text; each starts with its own line so that
no KV block is common to two requests. Otherwise ``none`` would reuse the shared filler through
prefix caching (off under evicting policies, whose blocks cannot be shared) and the comparison
would measure prefix reuse, not eviction.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvevict.bench.common import (BLOCK_SIZE, environment, label, markdown_table,
                                       start_server, stop_server, write_results)

RUNNING = re.compile(r'^vllm:num_requests_running\{[^}]*\}\s+([0-9.e+]+)', re.M)


def _serve(model_path: str, policy: str, budget: int | None, num_blocks: int,
           max_model_len: int, log_path: Path):
    flags = ["--kv-eviction-policy", policy]
    if policy != "none":
        flags += ["--kv-budget", str(budget)]
    return _serve_with(model_path, num_blocks, max_model_len, log_path, flags)


def _serve_with(model_path: str, num_blocks: int, max_model_len: int, log_path: Path,
                flags: list[str]):
    """``vllm serve`` the model as "m" with a pool of ``num_blocks`` and ``flags``; returns
    (process, url)."""
    return start_server(model_path, ["--max-model-len", str(max_model_len), "--enforce-eager",
                                     "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override",
                                     str(num_blocks), *flags], log_path)


def _load(base: str, prompts: list[str], max_tokens: int) -> dict:
    import requests
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=3600)
    most_running, stop = 0, threading.Event()

    def poll():
        nonlocal most_running
        while not stop.is_set():
            try:
                match = RUNNING.search(requests.get(f"{base}/metrics", timeout=5).text)
                if match:
                    most_running = max(most_running, int(float(match.group(1))))
            except requests.RequestException:
                pass
            time.sleep(0.25)

    def one(prompt: str) -> tuple[int, list[float]]:
        """Completion tokens and the arrival time of each streamed piece."""
        stream = client.completions.create(
            model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        arrivals, tokens = [], 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, arrivals

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(one, prompts))
    elapsed = time.perf_counter() - start
    stop.set()
    poller.join()
    produced = sum(tokens for tokens, _ in replies)
    return {"total_s": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed,
            "most_running": most_running, **decode_phase(replies)}


def decode_phase(replies: list[tuple[int, list[float]]]) -> dict:
    """Decode-phase figures from each request's token count and streamed arrival times.

    Inter-token latency: a request's time from its first to its last streamed piece over the
    tokens after the first; decode tokens/s: those tokens of all requests over the length of the
    union of the requests' first-to-last intervals (time with at least one request decoding).
    """
    gaps, intervals, decode_tokens = [], [], 0
    for tokens, arrivals in replies:
        if tokens > 1 and len(arrivals) > 1:
            gaps.append((arrivals[-1] - arrivals[0]) / (tokens - 1))
            intervals.append((arrivals[0], arrivals[-1]))
            decode_tokens += tokens - 1
    covered, end = 0.0, float("-inf")
    for first, last in sorted(intervals):
        covered += max(0.0, last - max(first, end))
        end = max(end, last)
    return {"mean_itl_ms": 1000 * sum(gaps) / len(gaps) if gaps else float("nan"),
            "decode_tok_s": decode_tokens / covered if covered else float("nan")}


def distinct_prompt(index: int, prompt: str) -> str:
    """``prompt`` behind a first line unique to ``index``: no prefix block is shared."""
    return f"Request {index}.\n{prompt}"


def run(model_path: str, out_dir: str, num_requests: int, prompt_tokens: int, max_tokens: int,
        budget: int, num_blocks: int, policies: list[str], name: str = "throughput") -> dict:
    from transformers import AutoTokenizer

    from vllm_kvevict.eval.passkey import make_trial

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [distinct_prompt(i, make_trial(tokenizer, prompt_tokens, (i + 0.5) / num_requests,
                                             str(10000 + 7919 * i)).prompt)
               for i in range(num_requests)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in policies:
        b = None if policy == "none" else budget
        # The same context limit for all: one request's prompt and output (with a margin).
        max_model_len = prompt_tokens + max_tokens + 256
        process, base = _serve(model_path, policy, b, num_blocks, max_model_len,
                               out / f"{name}-server.log")
        try:
            _load(base, prompts[:1], 4)  # warm-up
            result = _load(base, prompts, max_tokens)
        finally:
            stop_server(process)
        rows.append({"policy": policy, "budget": b, **result})
    (out / f"{name}-server.log").unlink(missing_ok=True)
    base_row = next(r for r in rows if r["policy"] == "none")
    for r in rows:
        r["concurrency_ratio"] = r["most_running"] / max(1, base_row["most_running"])
        r["tok_s_ratio"] = r["output_tok_s"] / base_row["output_tok_s"]
        r["time_ratio"] = r["total_s"] / base_row["total_s"]
        r["decode_tok_s_ratio"] = r["decode_tok_s"] / base_row["decode_tok_s"]
    floor = next((r for r in rows if r["policy"] == "streamingllm"), None)
    for r in rows:
        r["tok_s_vs_streamingllm"] = (r["output_tok_s"] / floor["output_tok_s"]
                                      if floor else None)
    payload = {"environment": environment(model_path),
               "settings": {"num_requests": num_requests, "prompt_tokens": prompt_tokens,
                            "max_tokens": max_tokens, "budget": budget, "kv_blocks": num_blocks,
                            "block_size": BLOCK_SIZE, "policies": policies,
                            "prompts": "distinct from the first block"},
               "results": rows}
    vs_floor = lambda r: (f"{r['tok_s_vs_streamingllm']:.2f}x"  # noqa: E731
                          if r["tok_s_vs_streamingllm"] is not None else "-")
    table = markdown_table(
        ["policy@budget", "most running", "output tok/s", "total s", "concurrency vs none",
         "tok/s vs none", "tok/s vs streamingllm", "time vs none", "decode tok/s",
         "decode tok/s vs none", "mean ITL ms"],
        [[label(r["policy"], r["budget"]), r["most_running"], f"{r['output_tok_s']:.1f}",
          f"{r['total_s']:.1f}", f"{r['concurrency_ratio']:.2f}x", f"{r['tok_s_ratio']:.2f}x",
          vs_floor(r), f"{r['time_ratio']:.2f}x", f"{r['decode_tok_s']:.1f}",
          f"{r['decode_tok_s_ratio']:.2f}x", f"{r['mean_itl_ms']:.1f}"] for r in rows])
    write_results(out_dir, name, payload,
                  f"{num_requests} concurrent streamed completions, ~{prompt_tokens}-token "
                  f"prompts, {max_tokens} tokens each (ignore_eos), KV pool of {num_blocks} "
                  f"blocks of {BLOCK_SIZE} tokens for every policy, prompts distinct from their "
                  f"first block (no prefix reuse); `vllm serve` + OpenAI client. Decode tok/s: "
                  f"tokens after each request's first over the time some request was decoding; "
                  f"mean ITL: mean time between a request's tokens after its first.\n\n"
                  + table)
    _plot(rows, out_dir, name)
    return payload


def _plot(rows, out_dir, name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [label(r["policy"], r["budget"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, [r["most_running"] for r in rows], color="tab:green")
    axes[0].set_title("most requests running at once")
    axes[1].bar(names, [r["output_tok_s"] for r in rows], color="tab:purple")
    axes[1].set_title("output tokens / s")
    axes[2].bar(names, [r["mean_itl_ms"] for r in rows], color="tab:orange")
    axes[2].set_title("mean inter-token latency (ms)")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}.png", dpi=110)
    plt.close(fig)
