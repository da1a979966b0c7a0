"""Batch throughput at equal KV memory through a real ``vllm serve`` and the OpenAI client.

Every policy gets the same KV pool (``--num-gpu-blocks-override`` blocks of 32 tokens, so the
comparison does not depend on how the platform sizes the cache) and the same load: N concurrent
streamed completions of ``max_tokens`` tokens each (``ignore_eos``). Two workloads use it:
``throughput`` (long prompts, short answers: prefill-heavy) and ``throughput-decode`` (short
prompts, long answers, as reasoning traffic: decode-heavy). Reported: the most requests running
at once (polled from the server's Prometheus ``/metrics``), output tokens/s and total time, each
as a ratio to ``none`` from the same run; and, apart from prefill, the decode phase: the mean
inter-token latency (time between a request's streamed tokens after its first) and decode
tokens/s (tokens after each request's first, over the time at least one request was decoding);
and the server's own host time of page work per step and page copies recalled per step (its
``/metrics``), which is where an evicting policy's steps differ from streamingllm's.

Prompts are passkey prompts, whose filler is shared text; each starts with its own line so that
no KV block is common to two requests. Otherwise ``none`` would reuse the shared filler through
prefix caching (off under evicting policies, whose blocks cannot be shared) and the comparison
would measure prefix reuse, not eviction.
"""
from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvevict.bench.common import (BLOCK_SIZE, SettingError, environment, label, markdown_table,
                                       server_series_sums, start_server, stop_server, write_results)

RUNNING = "vllm:num_requests_running"
# Host seconds of page work and the steps that had some (a histogram's sum and count).
PAGE_WORK = ("vllm:kvevict_page_work_seconds_sum", "vllm:kvevict_page_work_seconds_count")
# Page copies recalled from the host store (one layer each; one KV head's slice each under
# per-head selection).
RECALLED = "vllm:kvevict_page_copies_recalled_total"
WORK_SERIES = (*PAGE_WORK, RECALLED)


def policy_flags(entry: str) -> list[str]:
    """The ``vllm serve`` flags of a policies entry: ``POLICY``, or ``POLICY+SETTING[+...]``
    to measure a policy with other settings beside its defaults in the same run, each SETTING
    one of the plugin's flags without its dashes, ``NAME`` or ``NAME=VALUE`` (e.g.
    ``arkvale+no-kv-per-head-selection``, ``arkvale+kv-digest=cuboid-max``)."""
    policy, *settings = entry.split("+")
    flags = ["--kv-eviction-policy", policy]
    for setting in settings:
        name, has_value, value = setting.partition("=")
        if not name.startswith(("kv-", "no-kv-")) or (has_value and not value):
            raise SettingError(f"policy entry {entry!r}: {setting!r} is not one of the plugin's "
                               f"settings (kv-NAME, kv-NAME=VALUE or no-kv-NAME)")
        if name in ("kv-eviction-policy", "kv-budget"):
            raise SettingError(f"policy entry {entry!r}: {name} is the benchmark's own setting "
                               f"(the entry's policy; --set budget=N)")
        flags += [f"--{name}", *([value] if has_value else [])]
    return flags


def base_policy(entry: str) -> str:
    """The policy of a policies entry (see :func:`policy_flags`)."""
    return entry.partition("+")[0]


def _serve(model_path: str, entry: str, budget: int | None, num_blocks: int,
           max_model_len: int, log_path: Path):
    flags = policy_flags(entry)
    if budget is not None:
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
                running = server_series_sums(base, [RUNNING], timeout=5)[RUNNING]
                most_running = max(most_running, int(running))
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

    work_before = server_series_sums(base, WORK_SERIES)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(one, prompts))
    elapsed = time.perf_counter() - start
    stop.set()
    poller.join()
    produced = sum(tokens for tokens, _ in replies)
    work_after = server_series_sums(base, WORK_SERIES)
    return {"total_s": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed,
            "most_running": most_running, **decode_phase(replies),
            "page_work_ms": page_work_ms(work_before, work_after),
            "recalls_per_step": recalls_per_step(work_before, work_after)}


def page_work_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean host milliseconds of page work per worker step between two readings of the
    server's :data:`PAGE_WORK` series summed over workers (None: no step had page work, as
    under none and streamingllm, which export none)."""
    seconds, steps = (after[name] - before[name] for name in PAGE_WORK)
    return 1000 * seconds / steps if steps > 0 else None


def recalls_per_step(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean page copies recalled per worker step with page work between two readings of
    :data:`PAGE_WORK` and :data:`RECALLED` (None: no step had page work)."""
    steps = after[PAGE_WORK[1]] - before[PAGE_WORK[1]]
    return (after[RECALLED] - before[RECALLED]) / steps if steps > 0 else None


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
        budget: int, num_blocks: int, policies: list[str], name: str = "throughput",
        rounds: int = 1) -> dict:
    """Serve and load each policy ``rounds`` times, in rounds (each runs every policy once, the
    order reversed every other round, so that a drift of the machine's speed falls on both
    sides); results are per-round medians, ratios the median of each round's ratio."""
    from transformers import AutoTokenizer

    from vllm_kvevict.eval.passkey import make_trial

    if "none" not in policies:
        raise SettingError("policies must include none: every ratio is taken to it")
    for entry in policies:
        policy_flags(entry)  # a malformed entry fails before any server starts
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [distinct_prompt(i, make_trial(tokenizer, prompt_tokens, (i + 0.5) / num_requests,
                                             str(10000 + 7919 * i)).prompt)
               for i in range(num_requests)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_round = []
    for index in range(rounds):
        results = {}
        for policy in (policies if index % 2 == 0 else policies[::-1]):
            b = None if base_policy(policy) == "none" else budget
            # The same context limit for all: one request's prompt and output (with a margin).
            max_model_len = prompt_tokens + max_tokens + 256
            process, base = _serve(model_path, policy, b, num_blocks, max_model_len,
                                   out / f"{name}-server.log")
            try:
                _load(base, prompts[:1], 4)  # warm-up
                result = _load(base, prompts, max_tokens)
            finally:
                stop_server(process)
            results[policy] = {"policy": policy, "budget": b, **result}
        per_round.append(with_ratios([results[policy] for policy in policies]))
    (out / f"{name}-server.log").unlink(missing_ok=True)
    rows = median_rows(per_round)
    payload = {"environment": environment(model_path),
               "settings": {"num_requests": num_requests, "prompt_tokens": prompt_tokens,
                            "max_tokens": max_tokens, "budget": budget, "kv_blocks": num_blocks,
                            "block_size": BLOCK_SIZE, "policies": policies,
                            "prompts": "distinct from the first block", "rounds": rounds},
               "results": rows, **({"rounds": per_round} if rounds > 1 else {})}

    def vs_floor(r):
        if r["tok_s_vs_streamingllm"] is None:
            return "-"
        if rounds == 1:
            return f"{r['tok_s_vs_streamingllm']:.2f}x"
        low, high = r["tok_s_vs_streamingllm_range"]
        return f"{r['tok_s_vs_streamingllm']:.2f}x ({low:.2f}-{high:.2f})"
    table = markdown_table(
        ["policy@budget", "most running", "output tok/s", "total s", "concurrency vs none",
         "tok/s vs none", "tok/s vs streamingllm", "time vs none", "decode tok/s",
         "decode tok/s vs none", "mean ITL ms", "page work ms/step", "recalls/step"],
        [[label(r["policy"], r["budget"]), r["most_running"], f"{r['output_tok_s']:.1f}",
          f"{r['total_s']:.1f}", f"{r['concurrency_ratio']:.2f}x", f"{r['tok_s_ratio']:.2f}x",
          vs_floor(r), f"{r['time_ratio']:.2f}x", f"{r['decode_tok_s']:.1f}",
          f"{r['decode_tok_s_ratio']:.2f}x", f"{r['mean_itl_ms']:.1f}",
          "-" if r.get("page_work_ms") is None else f"{r['page_work_ms']:.2f}",
          "-" if r.get("recalls_per_step") is None else f"{r['recalls_per_step']:.0f}"]
         for r in rows])
    write_results(out_dir, name, payload,
                  f"{num_requests} concurrent streamed completions, ~{prompt_tokens}-token "
                  f"prompts, {max_tokens} tokens each (ignore_eos), KV pool of {num_blocks} "
                  f"blocks of {BLOCK_SIZE} tokens for every policy, prompts distinct from their "
                  f"first block (no prefix reuse); `vllm serve` + OpenAI client. Decode tok/s: "
                  f"tokens after each request's first over the time some request was decoding; "
                  f"mean ITL: mean time between a request's tokens after its first; page "
                  f"work: the server's host time of page work (plan and layers) per step that "
                  f"had some (`vllm:kvevict_page_work_seconds`), mean over the load; "
                  f"recalls: page copies (one layer each, one KV head's slice each under "
                  f"per-head selection) recalled from the host store per such step "
                  f"(`vllm:kvevict_page_copies_recalled`)."
                  + (f" Medians over {rounds} rounds (every policy once per round, the order "
                     f"reversed every other round); ratios: the median of the rounds' ratios, "
                     f"their range in brackets." if rounds > 1 else "") + "\n\n"
                  + table)
    _plot(rows, out_dir, name)
    return payload


def with_ratios(rows: list[dict]) -> list[dict]:
    """One round's rows with their ratios to ``none`` (which must be among them) and to
    ``streamingllm`` (None without it)."""
    base_row = next(r for r in rows if r["policy"] == "none")
    floor = next((r for r in rows if r["policy"] == "streamingllm"), None)
    for r in rows:
        r["concurrency_ratio"] = r["most_running"] / max(1, base_row["most_running"])
        r["tok_s_ratio"] = r["output_tok_s"] / base_row["output_tok_s"]
        r["time_ratio"] = r["total_s"] / base_row["total_s"]
        r["decode_tok_s_ratio"] = r["decode_tok_s"] / base_row["decode_tok_s"]
        r["tok_s_vs_streamingllm"] = (r["output_tok_s"] / floor["output_tok_s"]
                                      if floor else None)
    return rows


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per policy, the median over rounds of every figure (ratios: of each round's ratio, so
    that both sides of a ratio come from the same round), with the range of the ratio to
    streamingllm. One round: its rows as they are."""
    if len(rounds) == 1:
        return rounds[0]
    rows = []
    for runs in zip(*rounds):
        row = {"policy": runs[0]["policy"], "budget": runs[0]["budget"]}
        for key, value in runs[0].items():
            if key not in row and value is not None:  # counts: a count that occurred
                median = statistics.median_low if isinstance(value, int) else statistics.median
                row[key] = median(run[key] for run in runs)
        vs_floor = [run["tok_s_vs_streamingllm"] for run in runs]
        known = None not in vs_floor
        row["tok_s_vs_streamingllm"] = statistics.median(vs_floor) if known else None
        row["tok_s_vs_streamingllm_range"] = (min(vs_floor), max(vs_floor)) if known else None
        rows.append(row)
    return rows


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
        for text in axis.get_xticklabels():
            text.set_horizontalalignment("right")  # each label ends under its bar
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}.png", dpi=110)
    plt.close(fig)
