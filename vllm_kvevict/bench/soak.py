"""Soak: a real ``vllm serve`` per policy under a seeded mix of traffic, checked for errors and leaks.

The mix (the same requests, in the same order, for every policy; ``seed``): completions and
chat, streamed or not, prompts from a few tokens to ``max_model_len`` (log-uniform, plus bursts
of long prompts that overflow the KV pool of ``num_blocks`` blocks, so the scheduler preempts
and recomputes), ``max_tokens=1``, ``n=2`` (sampled, seeded), stop strings, clients that close a
stream after a few chunks, clients that give up on a non-streamed request after a short timeout
(the server aborts it), and bad requests (prompt past ``--max-model-len``, invalid sampling
parameters) that must get a 4xx. Arkvale runs with a host store of ``host_pages`` pages, which
fills. At most ``concurrency`` requests are in flight; no new request starts after
``time_limit_s``.

Reported per policy: requests by outcome and HTTP status; server errors (5xx, error events in a
200 stream, lost connections) and whether the server died (all must be 0); preemptions
(``vllm:num_preemptions_total``); what the plugin still holds after the run (worker: page-runtime
requests and host-store bytes; scheduler: host reservations, blocks held), read through vLLM's
``/collective_rpc`` dev endpoint (``VLLM_SERVER_DEV_MODE=1``, see ``engine.diagnostics``); the
resident memory of the server's process tree over the run (growth per 1000 requests: the slope
of RSS against completed requests after the first tenth); p50/p99 latency of completed requests.

Correctness: a request is *covered* when its prompt and ``max_tokens`` fit the budget, so no
policy evicts from it. Greedy (``temperature=0``, ``n=1``) covered requests that completed under
a policy and under ``none`` are compared token by token (``equal_to_none``); where they differ,
``none``'s server (run last and kept up for this) scores the first differing position, and the
difference must be a near-tie (:func:`compare_with_none`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvevict.bench.common import (BLOCK_SIZE, environment, label, markdown_table,
                                       start_server, stop_server, write_results)

PREEMPTIONS = re.compile(r'^vllm:num_preemptions_total\{[^}]*\}\s+([0-9.e+]+)', re.M)
RUNNING = re.compile(r'^vllm:num_requests_(running|waiting)\{[^}]*\}\s+([0-9.e+]+)', re.M)
BAD_KINDS = ("too_long", "temperature", "top_p", "max_tokens", "n")
WORDS = ("river stone light paper window garden music number orange cloud silver market "
         "letter summer engine forest bridge candle yellow travel winter doctor planet "
         "island mirror pocket rabbit ticket violin wonder").split()


@dataclasses.dataclass
class Spec:
    """One request of the mix."""
    index: int
    api: str  # "completion" | "chat"
    stream: bool
    prompt_tokens: int  # target length (the server reports the real one)
    max_tokens: int
    n: int = 1
    stop: list[str] | None = None
    action: str = "normal"  # normal | disconnect | abort | bad
    bad: str | None = None
    abort_after_s: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.n == 1 and self.action == "normal"


def make_mix(num_requests: int, max_model_len: int, seed: int) -> list[Spec]:
    """The seeded request mix (see the module docstring)."""
    rng = random.Random(seed)
    specs = []
    for i in range(num_requests):
        max_tokens = 1 if rng.random() < 0.1 else rng.choice([4, 8, 16, 32, 64])
        room = max_model_len - max_tokens - 40  # chat template and tokenization slack
        if i % 40 >= 34:  # a burst of 6 long prompts in every 40
            length = rng.randint(room // 2, room)
        else:
            length = int(math.exp(rng.uniform(math.log(3), math.log(room))))
        spec = Spec(i, "chat" if rng.random() < 0.4 else "completion", rng.random() < 0.5,
                    length, max_tokens)
        roll = rng.random()
        if roll < 0.08:
            spec.n = 2
        elif roll < 0.20:
            spec.stop = [rng.choice([".", "\n", " the"])]
        roll = rng.random()
        if roll < 0.08 and spec.stream:
            spec.action, spec.max_tokens = "disconnect", max(spec.max_tokens, 16)
        elif roll < 0.10 and not spec.stream:
            spec.action, spec.abort_after_s = "abort", rng.uniform(0.05, 1.0)
        elif roll < 0.13:
            spec.action, spec.bad = "bad", rng.choice(BAD_KINDS)
        specs.append(spec)
    return specs


def prompt_text(tokenizer, spec: Spec, max_model_len: int) -> str:
    """A prompt of about ``spec.prompt_tokens`` tokens (past ``max_model_len`` for a too-long
    bad request), distinct from its first line (no prefix reuse between requests)."""
    rng = random.Random(spec.index)
    target = max_model_len + 64 if spec.bad == "too_long" else spec.prompt_tokens
    head = f"Request {spec.index}."
    words = [rng.choice(WORDS) for _ in range(target)]
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    body = tokenizer.decode(ids[:max(0, target - 4)])
    return f"{head}\n{body}" if body else head


def payload(spec: Spec, prompt: str) -> tuple[str, dict]:
    body = {"model": "m", "max_tokens": spec.max_tokens, "temperature": 0.0, "n": spec.n,
            "stream": spec.stream, "return_token_ids": True}
    if spec.n > 1:
        body.update(temperature=0.8, seed=spec.index)
    if spec.stop:
        body["stop"] = spec.stop
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.bad == "temperature":
        body["temperature"] = -1.0
    elif spec.bad == "top_p":
        body["top_p"] = 1.5
    elif spec.bad == "max_tokens":
        body["max_tokens"] = -3
    elif spec.bad == "n":
        body["n"] = 0
    if spec.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _text(choice: dict, chat: bool, delta: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta" if delta else "message") or {}
    return part.get("content") or ""


def send(base: str, spec: Spec, prompt: str) -> dict:
    """Run one request; returns its outcome (status, texts, usage, latency, errors)."""
    import requests

    path, body = payload(spec, prompt)
    chat = spec.api == "chat"
    out = {"index": spec.index, "status": None, "outcome": "completed", "texts": None,
           "prompt_tokens": None, "error": None, "prompt_ids": None, "token_ids": []}
    start = time.perf_counter()
    timeout = (10, spec.abort_after_s) if spec.action == "abort" else (10, 900)
    try:
        response = requests.post(base + path, json=body, stream=spec.stream, timeout=timeout)
        out["status"] = response.status_code
        if response.status_code != 200:
            out["outcome"] = "rejected"
            try:
                out["error"] = response.json().get("error", {}).get("message")
            except ValueError:
                out["error"] = response.text[:300]
            return out
        texts = [""] * spec.n
        if not spec.stream:
            reply = response.json()
            for choice in reply["choices"]:
                texts[choice["index"]] = _text(choice, chat, delta=False)
            _take_ids(out, reply)
            out["prompt_tokens"] = reply["usage"]["prompt_tokens"]
        else:
            chunks = 0
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["outcome"], out["error"] = "stream_error", str(event["error"])[:300]
                    return out
                _take_ids(out, event)
                for choice in event.get("choices") or ():
                    piece = _text(choice, chat, delta=True)
                    texts[choice["index"]] += piece
                    chunks += bool(piece)
                if event.get("usage"):
                    out["prompt_tokens"] = event["usage"]["prompt_tokens"]
                if spec.action == "disconnect" and chunks >= 2:
                    response.close()
                    out["outcome"] = "disconnected"
                    return out
        out["texts"] = texts
        out["latency_s"] = time.perf_counter() - start
    except requests.exceptions.ReadTimeout:
        out["outcome"] = "aborted" if spec.action == "abort" else "timeout"
    except requests.exceptions.RequestException as e:
        out["outcome"], out["error"] = "connection_error", f"{type(e).__name__}: {e}"[:300]
    return out


def _take_ids(out: dict, reply: dict) -> None:
    """Prompt and first-choice token ids of a response or stream event (``return_token_ids``:
    the prompt's on the response (chat) or on the choice (completions))."""
    if reply.get("prompt_token_ids"):
        out["prompt_ids"] = reply["prompt_token_ids"]
    for choice in reply.get("choices") or ():
        if choice.get("prompt_token_ids"):
            out["prompt_ids"] = choice["prompt_token_ids"]
        if choice.get("index") == 0 and choice.get("token_ids"):
            out["token_ids"] += choice["token_ids"]


def plugin_state(base: str) -> list[dict] | None:
    """Every rank's :func:`vllm_kvevict.engine.diagnostics.plugin_state` (None if unreachable)."""
    import requests

    try:
        reply = requests.post(f"{base}/collective_rpc", json={"method": "kvevict_state"},
                              timeout=30)
        return reply.json()["results"] if reply.status_code == 200 else None
    except (requests.RequestException, ValueError, KeyError):
        return None


def metric(base: str, pattern: re.Pattern) -> list[tuple[str, float]]:
    import requests

    text = requests.get(f"{base}/metrics", timeout=10).text
    return [(m.group(1), float(m.group(m.lastindex))) for m in pattern.finditer(text)]


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (API server, engine core, workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = root.memory_info().rss
        for child in root.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def rss_growth_per_1000(samples: list[dict], num_requests: int) -> float:
    """Least-squares slope of RSS (MiB) against completed requests, after the first tenth."""
    points = [(s["done"], s["rss_mib"]) for s in samples if s["done"] >= num_requests / 10]
    if len(points) < 3 or points[-1][0] == points[0][0]:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / var if var else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def soak_one(model_path: str, policy: str, specs: list[Spec], prompts: list[str], settings: dict,
             log_path: Path, keep_running: bool = False):
    """One server, the whole mix; returns outcomes, counters and the state after the run, and
    ``(process, base_url)`` of the server (stopped unless ``keep_running``)."""
    import requests

    flags = ["--max-model-len", str(settings["max_model_len"]), "--enforce-eager",
             "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override",
             str(settings["num_blocks"]), "--no-enable-prefix-caching",
             "--kv-eviction-policy", policy]
    if policy != "none":
        flags += ["--kv-budget", str(settings["budget"])]
    host_gib = None
    if policy == "arkvale":  # a store of host_pages pages (30 layers of [32, 3 heads, 2 x 64] bf16)
        host_gib = (settings["host_pages"] + 0.5) * settings["page_bytes"] / 2**30
        flags += ["--kv-host-space", f"{host_gib:.9f}"]
    process, base = start_server(model_path, flags, log_path, env={"VLLM_SERVER_DEV_MODE": "1"})
    samples, stop, done = [], threading.Event(), [0]
    start = time.perf_counter()

    def monitor():
        while not stop.is_set():
            states = plugin_state(base)
            samples.append({"t": time.perf_counter() - start, "done": done[0],
                            "rss_mib": process_tree_rss(process.pid) / 2**20,
                            "host_mib": (sum(s["host_used_bytes"] for s in states) / 2**20
                                         if states else None)})
            stop.wait(settings["sample_every_s"])

    def run(spec: Spec) -> dict | None:
        if time.perf_counter() - start > settings["time_limit_s"]:
            return None
        result = send(base, spec, prompts[spec.index])
        done[0] += 1
        return result

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(settings["concurrency"]) as pool:
            results = list(pool.map(run, specs))
        elapsed = time.perf_counter() - start
        drained = _wait_idle(base, process)
        stop.set()
        watcher.join()
        states = _settled_state(base)
        preemptions = sum(v for _, v in metric(base, PREEMPTIONS))
        healthy = process.poll() is None and requests.get(f"{base}/health",
                                                          timeout=10).status_code == 200
    except BaseException:
        stop_server(process)
        raise
    finally:
        stop.set()
    exit_code = None if keep_running else stop_server(process)
    sent = [r for r in results if r is not None]
    latencies = [r["latency_s"] for r in sent if r.get("latency_s") is not None]
    outcomes, statuses = {}, {}
    for r in sent:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        if r["status"] is not None:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    bad = [(spec, r) for spec, r in zip(specs, results) if r is not None and spec.action == "bad"]
    server_errors = (sum(r["status"] is not None and r["status"] >= 500 for r in sent)
                     + outcomes.get("stream_error", 0) + outcomes.get("connection_error", 0)
                     + outcomes.get("timeout", 0))
    worker = states or []
    scheduler = worker[0].get("scheduler") if worker else None
    return (process, base), {
        "policy": policy, "budget": None if policy == "none" else settings["budget"],
        "host_store_pages": settings["host_pages"] if host_gib else None,
        "submitted": len(sent), "elapsed_s": elapsed, "outcomes": outcomes, "statuses": statuses,
        "server_errors": server_errors, "crashed": not healthy, "exit_code": exit_code,
        "drained": drained, "preemptions": int(preemptions),
        "bad_requests": len(bad),
        "bad_rejected_4xx": sum(r["status"] is not None and 400 <= r["status"] < 500
                                and bool(r["error"]) for _, r in bad),
        "good_rejected": sum(r["outcome"] == "rejected" for spec, r in zip(specs, results)
                             if r is not None and spec.action != "bad"),
        "state_after": worker,
        "plugin_requests_after": sum(s["requests"] for s in worker) if states else None,
        "host_bytes_after": sum(s["host_used_bytes"] for s in worker) if states else None,
        "scheduler_after": scheduler,
        "peak_host_mib": max((s["host_mib"] or 0 for s in samples), default=0),
        "rss_start_mib": samples[0]["rss_mib"] if samples else None,
        "rss_end_mib": samples[-1]["rss_mib"] if samples else None,
        "rss_peak_mib": max((s["rss_mib"] for s in samples), default=None),
        "rss_growth_mib_per_1000": rss_growth_per_1000(samples, len(specs)),
        "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
        "samples": samples,
        "greedy": {str(spec.index): {"prompt_ids": r["prompt_ids"], "token_ids": r["token_ids"],
                                     "text": r["texts"][0]}
                   for spec, r in zip(specs, results)
                   if r is not None and r["texts"] is not None and spec.greedy},
        "prompt_tokens": {str(spec.index): r["prompt_tokens"] for spec, r in zip(specs, results)
                          if r is not None and r["prompt_tokens"] is not None},
    }


def _wait_idle(base: str, process, timeout_s: float = 120) -> bool:
    """Wait until the server runs and queues nothing (aborts reach the engine asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if all(v == 0 for _, v in metric(base, RUNNING)):
                return True
        except Exception:  # noqa: BLE001 - a dead server is reported by the caller
            return False
        time.sleep(0.5)
    return False


def _settled_state(base: str, timeout_s: float = 30) -> list[dict] | None:
    """The plugin state once requests are gone: finished requests reach the workers with the
    engine's next step, so poll briefly until it is empty (or report what stays)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = plugin_state(base)
        empty = states is not None and all(
            s["requests"] == 0 and s["host_used_bytes"] == 0 and s["scheduler"]["requests"] == 0
            and s["scheduler"]["blocks_in_use"] == 0 and s["scheduler"]["host_reserved_pages"] == 0
            for s in states)
        if empty or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def compare_with_none(rows: list[dict], specs: list[Spec], budget: int, none_base: str,
                      tie_nats: float) -> None:
    """Fill each row's comparison with ``none`` over covered greedy requests.

    ``equal_to_none``: same tokens. A request that differs is looked at where it first differs:
    ``none``'s server (``none_base``, still running) scores that position alone; the two tokens
    chosen there are a near-tie if their log-probabilities are within ``tie_nats`` (CPU kernels
    are not batch-invariant, so a different batch can flip a near-tie, under ``none`` too).
    ``beyond_tie`` counts the others, which no batch effect explains (must be 0).
    """
    base = next(r for r in rows if r["policy"] == "none")["greedy"]
    max_tokens = {str(spec.index): spec.max_tokens for spec in specs}
    for row in rows:
        compared, mismatches = 0, []
        for key, out in row["greedy"].items():
            ref = base.get(key)
            if ref is None or not ref["prompt_ids"] or ref["prompt_ids"] != out["prompt_ids"]:
                continue
            if len(ref["prompt_ids"]) + max_tokens[key] > budget:
                continue  # not covered: the policy may evict from it
            compared += 1
            mine, theirs = out["token_ids"], ref["token_ids"]
            if mine == theirs:
                continue
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                      min(len(mine), len(theirs)))
            gap = None
            if at < min(len(mine), len(theirs)):
                gap = _logprob_gap(none_base, ref["prompt_ids"] + theirs[:at], mine[at], theirs[at])
            mismatches.append({"index": int(key), "prompt_tokens": len(ref["prompt_ids"]),
                               "at_token": at, "gap_nats": gap, "text": out["text"][:80],
                               "none": ref["text"][:80]})
        row["covered_compared"], row["mismatches"] = compared, mismatches
        row["equal_to_none"] = compared - len(mismatches)
        row["near_tie"] = sum(m["gap_nats"] is not None and m["gap_nats"] <= tie_nats
                              for m in mismatches)
        row["beyond_tie"] = len(mismatches) - row["near_tie"]
        row["max_gap_nats"] = max((m["gap_nats"] for m in mismatches
                                   if m["gap_nats"] is not None), default=0.0)


def _logprob_gap(base: str, prompt_ids: list[int], token: int, other: int) -> float:
    """|log p(token) - log p(other)| for the next token after ``prompt_ids`` (inf if either is
    not among the 20 most likely)."""
    import requests

    reply = requests.post(f"{base}/v1/completions", timeout=300, json={
        "model": "m", "prompt": prompt_ids, "max_tokens": 1, "temperature": 0, "logprobs": 20,
        "return_tokens_as_token_ids": True}).json()
    top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
    a, b = top.get(f"token_id:{token}"), top.get(f"token_id:{other}")
    return abs(a - b) if a is not None and b is not None else float("inf")


def run(model_path: str, out_dir: str, num_requests: int, concurrency: int, max_model_len: int,
        budget: int, num_blocks: int, host_pages: int, policies: list[str],
        time_limit_s: float, seed: int = 0, sample_every_s: float = 1.0,
        tie_nats: float = 0.5) -> dict:
    from transformers import AutoTokenizer

    if "none" not in policies:
        raise ValueError("the soak compares every policy with none: include it")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    specs = make_mix(num_requests, max_model_len, seed)
    prompts = [prompt_text(tokenizer, spec, max_model_len) for spec in specs]
    settings = {"num_requests": num_requests, "concurrency": concurrency,
                "max_model_len": max_model_len, "budget": budget, "num_blocks": num_blocks,
                "block_size": BLOCK_SIZE, "host_pages": host_pages,
                "page_bytes": _page_bytes(model_path), "policies": policies,
                "time_limit_s": time_limit_s, "seed": seed, "sample_every_s": sample_every_s,
                "tie_nats": tie_nats}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_policy = {}
    # none last: its server stays up to score where another policy's output differs
    for policy in [p for p in policies if p != "none"] + ["none"]:
        print(f"[soak] {policy} ...", flush=True)
        server, r = soak_one(model_path, policy, specs, prompts, settings,
                             out / "soak-server.log", keep_running=policy == "none")
        by_policy[policy] = r
        print(f"[soak] {policy}: {r['outcomes']} statuses {r['statuses']} server errors "
              f"{r['server_errors']} preemptions {r['preemptions']} in {r['elapsed_s']:.0f} s",
              flush=True)
    rows = [by_policy[p] for p in policies]
    try:
        compare_with_none(rows, specs, budget, server[1], tie_nats)
    finally:
        by_policy["none"]["exit_code"] = stop_server(server[0])
    (out / "soak-server.log").unlink(missing_ok=True)
    mix = {"chat": sum(s.api == "chat" for s in specs), "stream": sum(s.stream for s in specs),
           "n2": sum(s.n > 1 for s in specs), "stop": sum(bool(s.stop) for s in specs),
           "max_tokens_1": sum(s.max_tokens == 1 for s in specs),
           "disconnect": sum(s.action == "disconnect" for s in specs),
           "abort": sum(s.action == "abort" for s in specs),
           "bad": sum(s.action == "bad" for s in specs),
           "long_burst": sum(s.index % 40 >= 34 for s in specs),
           "covered_by_budget": sum(s.prompt_tokens + s.max_tokens + 40 <= budget for s in specs)}
    payload = {"environment": environment(model_path), "settings": settings, "mix": mix,
               "results": [{k: v for k, v in r.items() if k != "greedy"}
                           for r in rows]}
    write_results(out_dir, "soak", payload, _table(rows, settings, mix))
    _plot(rows, out_dir)
    return payload


def _page_bytes(model_path: str) -> int:
    """Bytes of one KV page over all layers (keys and values, 16-bit)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return config["num_hidden_layers"] * 2 * BLOCK_SIZE * heads * head * 2


def _table(rows: list[dict], settings: dict, mix: dict) -> str:
    def num(x, fmt="{:.1f}"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    table = markdown_table(
        ["policy@budget", "sent", "completed", "aborted / disconnected", "4xx (bad input)",
         "server errors", "crashed", "preemptions", "host MiB peak",
         "host pages reserved peak / store, refusals", "host bytes after",
         "plugin requests after", "RSS MiB start / end", "RSS growth MiB / 1000 req",
         "scheduler after: requests / blocks / host pages", "p50 / p99 latency s",
         "covered greedy = none", "differs: near-tie / beyond"],
        [[label(r["policy"], r["budget"]), r["submitted"], r["outcomes"].get("completed", 0),
          f"{r['outcomes'].get('aborted', 0)} / {r['outcomes'].get('disconnected', 0)}",
          f"{r['bad_rejected_4xx']}/{r['bad_requests']}", r["server_errors"],
          "yes" if r["crashed"] else "no", r["preemptions"], num(r["peak_host_mib"]),
          _host_cell(r["scheduler_after"]),
          num(r["host_bytes_after"], "{}"), num(r["plugin_requests_after"], "{}"),
          f"{num(r['rss_start_mib'], '{:.0f}')} / {num(r['rss_end_mib'], '{:.0f}')}",
          num(r["rss_growth_mib_per_1000"]),
          _scheduler_cell(r["scheduler_after"]),
          f"{num(r['latency_p50_s'], '{:.2f}')} / {num(r['latency_p99_s'], '{:.2f}')}",
          f"{r['equal_to_none']}/{r['covered_compared']}",
          f"{r['near_tie']} / {r['beyond_tie']}"] for r in rows])
    return (f"{settings['num_requests']} requests, up to {settings['concurrency']} at once, "
            f"seed {settings['seed']}, `--max-model-len {settings['max_model_len']}`, KV pool of "
            f"{settings['num_blocks']} blocks of {BLOCK_SIZE} tokens, budget "
            f"{settings['budget']} tokens, arkvale host store {settings['host_pages']} pages; "
            f"`vllm serve` per policy. Mix: {json.dumps(mix)}. Server errors: 5xx, error events "
            f"in a 200 stream, lost connections and timeouts (must be 0). After the run the "
            f"plugin's state is read through `/collective_rpc` (`VLLM_SERVER_DEV_MODE=1`). "
            f"RSS: the server's process tree; growth is the slope against completed requests "
            f"after the first tenth. Covered greedy = none: greedy requests whose prompt + "
            f"max_tokens fit the budget, same tokens as under `none`; where they differ, `none` "
            f"scores the first differing position alone: a near-tie when the two tokens' "
            f"log-probabilities are within {settings['tie_nats']} nats (CPU kernels are not "
            f"batch-invariant, so batches that differ between runs flip near-ties, under `none` "
            f"too); beyond: must be 0.\n\n" + table)


def _host_cell(state: dict | None) -> str:
    if not state or not state.get("host_pages"):
        return "-"
    return (f"{state['host_reserved_peak']} / {state['host_pages']}, "
            f"{state['host_full_refusals']}")


def _scheduler_cell(state: dict | None) -> str:
    if state is None:
        return "-"
    return f"{state['requests']} / {state['blocks_in_use']} / {state['host_reserved_pages']}"


def _plot(rows: list[dict], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for r in rows:
        t = [s["t"] for s in r["samples"]]
        axes[0].plot(t, [s["rss_mib"] for s in r["samples"]], label=label(r["policy"], r["budget"]))
        if r["policy"] == "arkvale":
            axes[1].plot(t, [s["host_mib"] or 0 for s in r["samples"]],
                         label=label(r["policy"], r["budget"]))
    axes[0].set_title("server resident memory (MiB)")
    axes[1].set_title("host store in use (MiB)")
    for axis in axes:
        axis.set_xlabel("seconds")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/soak.png", dpi=110)
    plt.close(fig)
