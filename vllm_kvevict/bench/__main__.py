"""``python -m vllm_kvevict.bench SUBCOMMAND [--quick] [--out DIR]``; see ``--help``."""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STATS_POLICIES = ["h2o", "tova", "roco", "snapkv", "lra", "lfa"]
ALL_POLICIES = ["none", "streamingllm", *STATS_POLICIES, "quest", "arkvale"]
RETRIEVAL_TASKS = ["needle-last", "needle-first", "multi-needle", "var-chain"]

# name -> (full settings, --quick settings)
SETTINGS = {
    "passkey": ({"lengths": [1000, 2000, 4000, 7000], "budgets": [256, 512, 1024, 2048],
                 "policies": ALL_POLICIES, "trials": 20, "engine_kwargs": {}},
                {"lengths": [1000], "budgets": [256], "policies":
                 ["none", "streamingllm", "arkvale"], "trials": 2, "engine_kwargs": {}}),
    # The policy family side by side at the cells (passkey's engine, own file).
    "policies": ({"lengths": [4000, 7000], "budgets": [512, 1024], "policies": ALL_POLICIES,
                  "trials": 10, "engine_kwargs": {}},
                 {"lengths": [600], "budgets": [256],
                  "policies": ["none", "h2o", "tova", "roco", "snapkv"], "trials": 1,
                  "engine_kwargs": {}}),
    # Needles, several needles and variable chains in natural prose (passkey's engine route).
    "retrieval": ({"lengths": [3000, 6000], "budgets": [512, 1024], "policies": ALL_POLICIES,
                   "tasks": RETRIEVAL_TASKS, "trials": 20, "engine_kwargs": {}},
                  {"lengths": [800], "budgets": [256], "policies":
                   ["none", "streamingllm", "arkvale"], "tasks": RETRIEVAL_TASKS, "trials": 1,
                   "engine_kwargs": {}}),
    # Page-level attention-statistics policies vs their token-level references (transformers).
    "reference": ({"prompt_tokens": 2000, "answer_tokens": 64, "budgets": [256, 512],
                   "policies": STATS_POLICIES, "trials": 3, "layers": [0, 7, 15, 22, 29]},
                  {"prompt_tokens": 600, "answer_tokens": 40, "budgets": [256],
                   "policies": STATS_POLICIES, "trials": 1, "layers": [0, 29]}),
    "perplexity": ({"num_tokens": 7000, "prefix": 256, "budgets": [512, 1024],
                    "policies": ALL_POLICIES},
                   {"num_tokens": 600, "prefix": 256, "budgets": [256],
                    "policies": ["none", "arkvale"]}),
    "latency": ({"prompt_tokens": 7000, "new_tokens": 256, "budgets": [512, 1024, 2048],
                 "rounds": 1},
                {"prompt_tokens": 800, "new_tokens": 16, "budgets": [256], "rounds": 1}),
    "recall": ({"prompt_tokens": 4000, "new_tokens": 16, "budgets": [256, 512, 1024],
                "trials": 10},
               {"prompt_tokens": 1000, "new_tokens": 8, "budgets": [256], "trials": 2}),
    "throughput": ({"num_requests": 16, "prompt_tokens": 4000, "max_tokens": 128, "budget": 512,
                    "num_blocks": 600, "policies": ["none", "streamingllm", "arkvale", "quest"],
                    "rounds": 1},
                   {"num_requests": 4, "prompt_tokens": 600, "max_tokens": 16, "budget": 256,
                    "num_blocks": 60, "policies": ["none", "arkvale"], "rounds": 1}),
    # Decode-heavy (reasoning-like) traffic at equal KV memory: short prompts, long answers.
    "throughput-decode": ({"num_requests": 16, "prompt_tokens": 1000, "max_tokens": 768,
                           "budget": 512, "num_blocks": 320,
                           "policies": ["none", "streamingllm", "arkvale", "quest", "h2o",
                                        "tova", "roco", "snapkv"], "rounds": 1},
                          {"num_requests": 4, "prompt_tokens": 300, "max_tokens": 24,
                           "budget": 256, "num_blocks": 40,
                           "policies": ["none", "streamingllm", "arkvale"], "rounds": 2}),
    # Prefix-cache eviction (lru vs marconi) on a multi-tenant trace through `vllm serve`.
    "prefix": ({"policies": ["lru", "marconi"], "num_requests": 80, "num_blocks": 128,
                "max_model_len": 2048, "max_tokens": 8, "concurrency": 2, "doc_words": 1100,
                "system_words": 350, "turn_words": 110, "oneoff_words": 600, "num_docs": 4,
                "num_systems": 3, "num_conversations": 3, "alloc_blocks": 4096,
                "alloc_requests": 1000},
               {"policies": ["lru", "marconi"], "num_requests": 12, "num_blocks": 40,
                "max_model_len": 1024, "max_tokens": 4, "concurrency": 2, "doc_words": 200,
                "system_words": 100, "turn_words": 40, "oneoff_words": 150, "num_docs": 2,
                "num_systems": 1, "num_conversations": 1, "alloc_blocks": 256,
                "alloc_requests": 50}),
    # Reliability: a seeded mix of traffic, bad input and client aborts per policy (`vllm serve`).
    "soak": ({"num_requests": 1000, "concurrency": 32, "max_model_len": 384, "budget": 192,
              "num_blocks": 72, "host_pages": 48, "time_limit_s": 240,
              "policies": ["none", "streamingllm", "arkvale", "h2o", "quest"]},
             {"num_requests": 40, "concurrency": 8, "max_model_len": 384, "budget": 192,
              "num_blocks": 30, "host_pages": 16, "time_limit_s": 150,
              "policies": ["none", "arkvale", "h2o"]}),
    # Triton kernels on synthetic K/V (GPU; --quick runs them through the interpreter on CPU).
    "kernels": ({"contexts": [8192, 32768, 131072], "batches": [1, 8, 32],
                 "budgets": [1024, 2048, 4096], "page_size": 32, "num_q_heads": 32,
                 "num_kv_heads": 8, "head_dim": 128, "repeats": 20},
                {"contexts": [256], "batches": [2], "budgets": [64], "page_size": 16,
                 "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 32, "repeats": 1}),
}
# Not part of `all`: kernels needs a GPU to mean anything, and no model; soak has its own test
# and takes about 20 minutes at its defaults.
NOT_IN_ALL = {"kernels", "soak"}


def _runner(name: str):
    if name == "kernels":
        from vllm_kvevict.bench import kernels

        return kernels.run
    from vllm_kvevict.bench import (latency, passkey, perplexity, prefix, recall, reference,
                                    retrieval, soak, throughput)

    return {"passkey": passkey.run, "policies": functools.partial(passkey.run, name="policies"),
            "reference": reference.run, "perplexity": perplexity.run, "latency": latency.run,
            "recall": recall.run, "throughput": throughput.run, "prefix": prefix.run,
            "soak": soak.run, "retrieval": retrieval.run,
            "throughput-decode": functools.partial(throughput.run, name="throughput-decode")}[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvevict.bench", description=__doc__)
    parser.add_argument("command", choices=[*SETTINGS, "all"])
    parser.add_argument("--quick", action="store_true", help="reduced settings (smoke test)")
    parser.add_argument("--out", default="docs/bench", help="directory for JSON/markdown/PNG")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set trials=10 --set budgets=256,512 "
                             "--set engine_kwargs=kv_digest:cuboid-max (passkey, policies, "
                             "retrieval)")
    parser.add_argument("--merge", action="append", default=[], metavar="JSON",
                        help="passkey/policies/retrieval only: run nothing, write one table and "
                             "plot from the cells of these earlier runs' JSON files")
    args = parser.parse_args(argv)
    if args.merge:
        if args.command not in ("passkey", "policies", "retrieval"):
            parser.error("--merge applies to passkey, policies and retrieval results only")
        from vllm_kvevict.bench import passkey, retrieval

        merge = retrieval.merge if args.command == "retrieval" else passkey.merge
        try:
            merge(args.out, args.command, args.merge)
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"cannot merge: {e}")
        print(f"[bench] {args.command}: merged {len(args.merge)} runs -> "
              f"{args.out}/{args.command}.md", file=sys.stderr)
        return 0
    from vllm_kvevict.bench.common import SettingError, bundled_model

    names = ([n for n in SETTINGS if n not in NOT_IN_ALL] if args.command == "all"
             else [args.command])
    model = None if names == ["kernels"] else bundled_model()
    for name in names:
        settings = dict(SETTINGS[name][1 if args.quick else 0])
        for item in args.set:
            key, _, value = item.partition("=")
            if key in settings:
                settings[key] = _parse(value, settings[key])
            elif args.command != "all":
                parser.error(f"{name} has no setting {key!r}; it has: {', '.join(settings)}")
        start = time.perf_counter()
        print(f"[bench] {name}: {settings}", file=sys.stderr, flush=True)
        try:
            _runner(name)(model, args.out, **settings)
        except SettingError as e:
            parser.error(f"{name}: {e}")
        print(f"[bench] {name} done in {time.perf_counter() - start:.0f} s -> {args.out}/{name}.md",
              file=sys.stderr, flush=True)
    return 0


def _parse(value: str, like):
    if isinstance(like, dict):  # engine keywords: key:value,key:value (values as Python literals)
        import ast

        pairs = [item.partition(":") for item in value.split(",") if item]
        return {key: _literal(ast, raw) for key, _, raw in pairs}
    if isinstance(like, list):
        kind = type(like[0]) if like else str
        return [kind(v) for v in value.split(",") if v]
    return type(like)(value)


def _literal(ast, raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


if __name__ == "__main__":
    sys.exit(main())
