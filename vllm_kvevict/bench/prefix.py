"""Prefix-cache eviction (``--prefix-cache-eviction-policy``) on a multi-tenant trace through a
real ``vllm serve``, plus the allocation path's cost with no engine.

The trace (the same for every policy, seeded): a few long shared contexts revisited over time --
documents asked new questions, system prompts in front of new user messages, multi-turn
conversations that grow turn by turn (the assistant turns are fixed text, so the trace does not
depend on what the model answers) -- interleaved with one-off prompts that share nothing and
churn a prefix cache too small to hold everything (``num_blocks`` blocks of 32 tokens). Requests
go out in trace order over ``concurrency`` client threads, streamed, ``max_tokens`` tokens each.

Per policy: token hit rate (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``), prefill
tokens computed (prompt tokens minus those served from the cache), TTFT p50/p95 (client side,
from sending the request to its first streamed token) and total time; all counters read from the
server's ``/metrics`` as differences around the trace (a warm-up request before is excluded).

Allocation path: vLLM's ``BlockPool`` and the plugin's ``MarconiBlockPool`` built by hand, fed
the same synthetic stream of requests (shared chains and one-offs) once the pool is full of cached
blocks, so nearly every block handed out gives up a cached one: time per ``get_new_blocks`` call
and per block, and for marconi (tuned online) the time spent replaying windows.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvevict.bench.common import (BLOCK_SIZE, environment, markdown_table, median,
                                       server_series_sums, write_results)

WORDS = ("account answer apple area army baby back ball bank base bath bear bed bell bird "
         "blood boat body bone book box boy brain bread bridge brother cake camera card care "
         "case cat chair chance child city class clock cloud coat coffee color corner country "
         "course cup dance data day death desk dinner doctor dog door dream dress drink driver "
         "earth egg energy engine evening eye face fact family farm father field fire fish floor "
         "flower food foot forest friend game garden gate girl glass gold grass ground group "
         "hair hand hat head heart hill history home horse hospital hotel house idea iron "
         "island job key king kitchen lake land language law leaf letter level library light "
         "line lion list machine map market meal metal method milk mind minute money month "
         "moon morning mother mountain mouse music name nation nature news night noise north "
         "number ocean office oil page paper parent party path peace pen people person piano "
         "picture plane plant plate player pocket point power price problem queen question "
         "radio rain reason river road rock room rule salt sand school science sea season "
         "seat sense shape ship shoe shop side sign silver sister size skin sky snow song "
         "sound space speed spring square star station stone story street student summer "
         "sun system table teacher team theory thing time tool town train tree truth uncle "
         "unit valley village voice wall water wave weather week window winter wood word "
         "work world year").split()
COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
            "vllm:prompt_tokens_cached")


def _text(rng: random.Random, num_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(num_words)]
    return " ".join(words).capitalize() + "."


def make_trace(num_requests: int, doc_words: int, system_words: int, turn_words: int,
               oneoff_words: int, num_docs: int, num_systems: int, num_conversations: int,
               seed: int = 0, max_conversation_words: int | None = None) -> list[dict]:
    """The requests in order: ``{"kind", "tenant", "prompt"}``.

    Shares: one-offs 35%, documents 25% (popularity falling with the index, as Zipf), system
    prompts 20%, conversation turns 20%. Words are drawn from a fixed list, so a prompt of n
    words is about 1.3 n tokens. A conversation that would pass ``max_conversation_words``
    starts over as a new session (a new first line, so nothing is shared with the old one).
    """
    rng = random.Random(seed)
    docs = [f"Document {i}.\n{_text(rng, doc_words)}\n" for i in range(num_docs)]
    systems = [f"System prompt {i}. You are assistant {i}. {_text(rng, system_words)}\n"
               for i in range(num_systems)]
    conversations: list[str] = [f"Conversation {i}.\n" for i in range(num_conversations)]
    trace = []
    for n in range(num_requests):
        draw = rng.random()
        if draw < 0.35:
            kind, tenant = "one-off", f"once{n}"
            prompt = f"One-off request {n}.\n{_text(rng, oneoff_words)}\nSummary:"
        elif draw < 0.60:
            weights = [1 / (i + 1) for i in range(num_docs)]
            i = rng.choices(range(num_docs), weights)[0]
            kind, tenant = "document", f"doc{i}"
            prompt = f"{docs[i]}Question {n}: {_text(rng, 12)}\nAnswer:"
        elif draw < 0.80:
            i = rng.randrange(num_systems)
            kind, tenant = "system", f"system{i}"
            prompt = f"{systems[i]}User {n}: {_text(rng, 30)}\nAssistant:"
        else:
            i = rng.randrange(num_conversations)
            kind, tenant = "conversation", f"conversation{i}"
            if (max_conversation_words is not None and len(conversations[i].split())
                    + 2 * turn_words > max_conversation_words):
                conversations[i] = f"Conversation {i}, session {n}.\n"
            conversations[i] += f"User: {_text(rng, turn_words)}\n"
            prompt = conversations[i] + "Assistant:"
            conversations[i] = prompt + f" {_text(rng, turn_words // 2)}\n"
        trace.append({"kind": kind, "tenant": tenant, "prompt": prompt})
    return trace


def _policy_flags(policy: str) -> list[str]:
    name, _, alpha = policy.partition(":")
    flags = ["--enable-prefix-caching", "--prefix-cache-eviction-policy", name]
    return flags + (["--prefix-cache-alpha", alpha] if alpha else [])


def _counters(base: str) -> dict[str, float]:
    totals = server_series_sums(base, [f"{name}_total" for name in COUNTERS])
    return {name: totals[f"{name}_total"] for name in COUNTERS}


def _run_trace(base: str, trace: list[dict], max_tokens: int, concurrency: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=3600)
    ttft: list[float | None] = [None] * len(trace)
    lock, cursor = threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                i = cursor[0]
                cursor[0] += 1
            if i >= len(trace):
                return
            sent = time.perf_counter()
            stream = client.completions.create(
                model="m", prompt=trace[i]["prompt"], max_tokens=max_tokens, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            for chunk in stream:
                if ttft[i] is None and chunk.choices and chunk.choices[0].text:
                    ttft[i] = time.perf_counter() - sent

    before = _counters(base)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    total = time.perf_counter() - start
    after = _counters(base)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    times = sorted(t for t in ttft if t is not None)
    return {
        "total_s": total,
        "token_hit_rate": (delta["vllm:prefix_cache_hits"]
                           / max(1.0, delta["vllm:prefix_cache_queries"])),
        "prompt_tokens": int(delta["vllm:prompt_tokens"]),
        "cached_prompt_tokens": int(delta["vllm:prompt_tokens_cached"]),
        "prefill_tokens_computed": int(delta["vllm:prompt_tokens"]
                                       - delta["vllm:prompt_tokens_cached"]),
        "ttft_p50_ms": 1000 * median(times),
        "ttft_p95_ms": 1000 * _percentile(times, 0.95),
        "ttft_by_kind_p50_ms": {kind: 1000 * median([t for t, r in zip(ttft, trace)
                                                    if r["kind"] == kind and t is not None])
                                for kind in sorted({r["kind"] for r in trace})},
    }


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _marconi_log(log_path: Path) -> list[str]:
    return [line.split("vllm-kvevict: ", 1)[1].strip()
            for line in log_path.read_text().splitlines() if "marconi alpha" in line]


def run(model_path: str, out_dir: str, policies: list[str], num_requests: int,
        num_blocks: int, max_model_len: int, max_tokens: int, concurrency: int,
        doc_words: int, system_words: int, turn_words: int, oneoff_words: int, num_docs: int,
        num_systems: int, num_conversations: int, alloc_blocks: int,
        alloc_requests: int) -> dict:
    from vllm_kvevict.bench.throughput import _serve_with

    # ~1.3 tokens per word; keep every conversation turn inside max_model_len
    trace = make_trace(num_requests, doc_words, system_words, turn_words, oneoff_words,
                       num_docs, num_systems, num_conversations,
                       max_conversation_words=int((max_model_len - max_tokens - 64) / 1.5))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in policies:
        log_path = out / "prefix-server.log"
        process, base = _serve_with(model_path, num_blocks, max_model_len, log_path,
                                    _policy_flags(policy))
        try:
            _run_trace(base, [{"prompt": "Warm-up.", "kind": "warm-up"}], 2, 1)
            result = _run_trace(base, trace, max_tokens, concurrency)
        finally:
            process.terminate()
            process.wait(timeout=60)
        rows.append({"policy": policy, **result, "tuning": _marconi_log(log_path)})
        log_path.unlink(missing_ok=True)
    lru = next((r for r in rows if r["policy"] == "lru"), rows[0])
    for r in rows:
        r["hit_rate_vs_lru"] = (r["token_hit_rate"] / lru["token_hit_rate"]
                                if lru["token_hit_rate"] else float("nan"))
        r["ttft_p95_vs_lru"] = r["ttft_p95_ms"] / lru["ttft_p95_ms"]
        r["prefill_vs_lru"] = r["prefill_tokens_computed"] / max(1, lru["prefill_tokens_computed"])
    alloc = allocation_benchmark(alloc_blocks, alloc_requests)
    kinds = {kind: sum(r["kind"] == kind for r in trace)
             for kind in sorted({r["kind"] for r in trace})}
    payload = {"environment": environment(model_path),
               "settings": {"policies": policies, "num_requests": num_requests,
                            "kv_blocks": num_blocks, "block_size": BLOCK_SIZE,
                            "max_model_len": max_model_len, "max_tokens": max_tokens,
                            "concurrency": concurrency, "doc_words": doc_words,
                            "system_words": system_words, "turn_words": turn_words,
                            "oneoff_words": oneoff_words, "num_docs": num_docs,
                            "num_systems": num_systems, "num_conversations": num_conversations,
                            "requests_by_kind": kinds, "alloc_blocks": alloc_blocks,
                            "alloc_requests": alloc_requests},
               "results": rows, "allocation": alloc}
    table = markdown_table(
        ["policy", "token hit rate", "hit rate vs lru", "prefill tokens computed",
         "prefill vs lru", "TTFT p50 ms", "TTFT p95 ms", "p95 vs lru", "total s"],
        [[r["policy"], f"{r['token_hit_rate']:.3f}", f"{r['hit_rate_vs_lru']:.2f}x",
          r["prefill_tokens_computed"], f"{r['prefill_vs_lru']:.2f}x", f"{r['ttft_p50_ms']:.0f}",
          f"{r['ttft_p95_ms']:.0f}", f"{r['ttft_p95_vs_lru']:.2f}x", f"{r['total_s']:.1f}"]
         for r in rows])
    alloc_table = markdown_table(
        ["pool", "get_new_blocks calls", "us per call (median of 5)", "us per block",
         "vs lru", "alpha tuning (ms per window)"],
        [[a["pool"], a["calls"], f"{a['us_per_call']:.1f}", f"{a['us_per_block']:.2f}",
          f"{a['us_per_call'] / alloc[0]['us_per_call']:.2f}x",
          f"{a['tune_ms']:.0f}" if a["tune_ms"] is not None else "-"] for a in alloc])
    tuning = "\n".join(f"- {r['policy']}: " + "; ".join(r["tuning"]) for r in rows if r["tuning"])
    write_results(out_dir, "prefix", payload,
                  f"{num_requests} streamed completions ({kinds}) through `vllm serve`, "
                  f"{concurrency} client threads in trace order, {max_tokens} tokens each "
                  f"(ignore_eos), a pool of {num_blocks} blocks of {BLOCK_SIZE} tokens for every "
                  f"policy. Token hit rate: prefix-cache hits / queries (tokens); prefill tokens "
                  f"computed: prompt tokens not served from the cache; TTFT measured by the "
                  f"client.\n\n" + table
                  + ("\n\nAlpha tuning (server log):\n" + tuning if tuning else "")
                  + f"\n\nAllocation path (no engine): hand-built pools of {alloc_blocks} blocks, "
                  f"{alloc_requests} requests after the pool is full of cached blocks, so each "
                  f"block handed out gives up a cached one.\n\n" + alloc_table)
    _plot(rows, out_dir)
    return payload


def allocation_benchmark(num_blocks: int, num_requests: int, repeats: int = 5) -> list[dict]:
    """Time of ``get_new_blocks`` in vLLM's pool and the Marconi pool on the same stream."""
    import types

    from vllm.v1.core.block_pool import BlockPool

    from vllm_kvevict.engine.prefix_cache import MarconiBlockPool
    from vllm_kvevict.prefix_cache.config import PrefixCacheConfig
    from vllm_kvevict.prefix_cache.marconi import BlockCost

    cost = BlockCost(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                     intermediate_size=1536, block_size=BLOCK_SIZE,
                     bytes_per_block=2 * 30 * 3 * 64 * 2 * BLOCK_SIZE)
    rng = random.Random(0)
    shared = [[f"s{c}.{i}".encode() for i in range(rng.randint(8, 64))] for c in range(40)]
    stream = []
    for n in range(num_requests * 2):  # the first half fills the pool
        if rng.random() < 0.5:
            chain = shared[rng.randrange(len(shared))]
            chain = chain + [f"q{n}.{i}".encode() for i in range(rng.randint(1, 4))]
        else:
            chain = [f"o{n}.{i}".encode() for i in range(rng.randint(4, 48))]
        stream.append(chain)
    results = []
    for name in ("lru", "marconi", "marconi:1.0"):
        per_call = []
        for _ in range(repeats):
            if name == "lru":
                pool = BlockPool(num_blocks, enable_caching=True, hash_block_size=BLOCK_SIZE)
            else:
                alpha = float(name.partition(":")[2]) if ":" in name else None
                pool = MarconiBlockPool(num_blocks, enable_caching=True,
                                        hash_block_size=BLOCK_SIZE, cost=cost,
                                        settings=PrefixCacheConfig("marconi", alpha=alpha))
            spent, calls, blocks = 0.0, 0, 0
            for n, chain in enumerate(stream):
                request = types.SimpleNamespace(request_id=f"r{n}", block_hashes=chain)
                if name != "lru":
                    pool.note_request(request)  # what the scheduler's add_request does
                hit = []
                while len(hit) < len(chain):
                    found = pool.get_cached_block(chain[len(hit)], [0])
                    if not found:
                        break
                    hit.append(found[0])
                pool.touch(hit)
                start = time.perf_counter()
                new = pool.get_new_blocks(len(chain) - len(hit))
                if n >= num_requests:
                    spent += time.perf_counter() - start
                    calls += 1
                    blocks += len(new)
                pool.cache_full_blocks(request, hit + new, len(hit), len(chain), BLOCK_SIZE, 0)
                pool.free_blocks(reversed(hit + new))
            per_call.append(spent / calls)
            tuner = getattr(pool, "tuner", None)
        results.append({"pool": name, "calls": calls, "blocks": blocks,
                        "us_per_call": 1e6 * median(per_call),
                        "us_per_block": 1e6 * median(per_call) * calls / max(1, blocks),
                        "tune_ms": (1000 * tuner.last_tune_s if tuner is not None
                                    and tuner.num_tunes else None)})
    return results


def _plot(rows, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, [r["token_hit_rate"] for r in rows], color="tab:green")
    axes[0].set_title("token hit rate")
    axes[1].bar(names, [r["prefill_tokens_computed"] for r in rows], color="tab:purple")
    axes[1].set_title("prefill tokens computed")
    width = 0.4
    xs = range(len(rows))
    axes[2].bar([x - width / 2 for x in xs], [r["ttft_p50_ms"] for r in rows], width,
                label="p50")
    axes[2].bar([x + width / 2 for x in xs], [r["ttft_p95_ms"] for r in rows], width,
                label="p95")
    axes[2].set_xticks(list(xs), names)
    axes[2].set_title("TTFT (ms)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(f"{out_dir}/prefix.png", dpi=110)
    plt.close(fig)
