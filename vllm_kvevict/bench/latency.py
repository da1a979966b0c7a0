"""Per-token decode latency at long context: none vs arkvale at several budgets, and arkvale's
overhead when its budget covers the whole context (nothing evicted, pages still backed up)."""
from __future__ import annotations

import time

from tqdm import tqdm

from vllm_kvevict.bench.common import (bar_plot, close_llm, environment, label, markdown_table,
                                       median, offline_llm, write_results)


def _decode_step_times(llm, prompt: str, new_tokens: int, repeats: int) -> list[float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine = llm.llm_engine
    times = []
    for r in range(repeats):
        engine.add_request(f"lat{r}", prompt, params)
        produced = 0
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - start
            count = sum(len(o.outputs[0].token_ids) for o in outputs) if outputs else produced
            if produced >= 1 and count > produced:  # a decode step (the first token is prefill)
                times.append(elapsed)
            produced = max(produced, count)
        engine.step()  # flush the finished request to the workers
    return times


def run(model_path: str, out_dir: str, prompt_tokens: int, new_tokens: int, budgets: list[int],
        repeats: int = 1) -> dict:
    from transformers import AutoTokenizer

    from vllm_kvevict.eval.passkey import make_trial

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt = make_trial(tokenizer, prompt_tokens, 0.5, "12345").prompt
    covering = 1 << (prompt_tokens + new_tokens).bit_length()
    configs = [("none", None)] + [("arkvale", b) for b in budgets] + [("arkvale", covering)]
    rows = []
    for policy, budget in tqdm(configs, desc="latency"):
        llm = offline_llm(model_path, policy, budget)
        try:
            _decode_step_times(llm, prompt, 8, 1)  # warm-up
            times = _decode_step_times(llm, prompt, new_tokens, repeats)
        finally:
            close_llm(llm)
        rows.append({"policy": policy, "budget": budget, "covers_context": budget == covering,
                     "median_ms": 1000 * median(times), "steps": len(times),
                     "p90_ms": 1000 * sorted(times)[int(0.9 * (len(times) - 1))]})
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_none"] = r["median_ms"] / base
    payload = {"environment": environment(model_path),
               "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                            "budgets": budgets, "covering_budget": covering, "repeats": repeats},
               "results": rows}
    table = markdown_table(
        ["policy@budget", "median ms/token", "p90 ms/token", "vs none"],
        [[label(r["policy"], r["budget"]) + (" (covers context)" if r["covers_context"] else ""),
          f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['ratio_to_none']:.2f}x"]
         for r in rows])
    write_results(out_dir, "latency", payload,
                  f"Decode latency per token, one request, ~{prompt_tokens}-token prompt, "
                  f"{new_tokens} generated tokens (engine step times after the first token).\n\n"
                  + table)
    _plot(rows, out_dir)
    return payload



def _plot(rows, out_dir) -> None:
    bar_plot([label(r["policy"], r["budget"]) for r in rows], [r["median_ms"] for r in rows],
             "median ms per decode step", "decode latency", f"{out_dir}/latency.png", "tab:orange")
