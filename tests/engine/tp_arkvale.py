"""TP=2 run for test_tensor_parallel.py (own process: two CPU workers, one core each).

Usage: python tp_arkvale.py MODEL_DIR OUT_JSON
"""
import json
import sys


def page_stats(worker):
    from vllm_kvevict.engine.page_runtime import current_runtime

    runtime = current_runtime()
    if runtime is None:
        return None
    stats = runtime.stats
    return {"backed_up": stats.backed_up, "recalled": stats.recalled,
            "used_pages": runtime.store.used_pages,
            "num_kv_heads": runtime.store.digests[0].shape[2]}


def main(model_dir: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    import vllm_kvevict

    vllm_kvevict.register()
    prompts = [f"Item {i}: " + "alpha beta gamma delta " * (40 + 60 * i) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    results = {}
    for name, settings in [("none", {"kv_eviction_policy": "none", "block_size": 32}),
                           ("covering", {"kv_eviction_policy": "arkvale", "kv_budget": 4096}),
                           ("evicting", {"kv_eviction_policy": "arkvale", "kv_budget": 128,
                                         "kv_sink_tokens": 32, "kv_window_tokens": 32})]:
        llm = LLM(model_dir, tensor_parallel_size=2, distributed_executor_backend="mp",
                  enforce_eager=True, max_model_len=2048, seed=0, **settings)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results[name] = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                         "stats": llm.collective_rpc(page_stats)}
        llm.llm_engine.engine_core.shutdown()
        del llm
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
