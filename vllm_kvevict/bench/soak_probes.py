"""What the soak reads from a running server: Prometheus counters, the plugin's state (vLLM's
``/collective_rpc`` dev endpoint), resident memory, and ``none``'s view where outputs differ."""
from __future__ import annotations

import re
import time

from vllm_kvevict.bench.soak_traffic import Spec

PREEMPTIONS = re.compile(r'^vllm:num_preemptions_total\{[^}]*\}\s+([0-9.e+]+)', re.M)
RUNNING = re.compile(r'^vllm:num_requests_(running|waiting)\{[^}]*\}\s+([0-9.e+]+)', re.M)


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


def wait_idle(base: str, process, timeout_s: float = 120) -> bool:
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


def settled_state(base: str, timeout_s: float = 30) -> list[dict] | None:
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
