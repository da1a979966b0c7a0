"""Soak: a real ``vllm serve`` per policy under a seeded mix of traffic, checked for errors and
leaks.

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

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvevict.bench.common import (BLOCK_SIZE, SettingError, environment, label, markdown_table,
                                       start_server, stop_server, write_results)
from vllm_kvevict.bench.soak_probes import (PREEMPTIONS, compare_with_none, metric, percentile,
                                            plugin_state, process_tree_rss, rss_growth_per_1000,
                                            settled_state, wait_idle)
from vllm_kvevict.bench.soak_traffic import Spec, make_mix, prompt_text, send


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
        drained = wait_idle(base, process)
        stop.set()
        watcher.join()
        states = settled_state(base)
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


def run(model_path: str, out_dir: str, num_requests: int, concurrency: int, max_model_len: int,
        budget: int, num_blocks: int, host_pages: int, policies: list[str],
        time_limit_s: float, seed: int = 0, sample_every_s: float = 1.0,
        tie_nats: float = 0.5) -> dict:
    from transformers import AutoTokenizer

    if "none" not in policies:
        raise SettingError("the soak compares every policy with none: include it")
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
