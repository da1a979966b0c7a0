"""Per-token decode latency at long context: none vs arkvale at several budgets, and arkvale's
overhead when its budget covers the whole context (nothing evicted, pages still backed up).

Beside each arkvale budget, the floors it is measured against: streamingllm at the same budget
(the same resident pages, no page work) and none over a prompt of about the budget's length
(attention over as many tokens, no eviction machinery at all)."""
from __future__ import annotations

import time

from tqdm import tqdm

from vllm_kvevict.bench.common import (close_llm, environment, label, markdown_table, median,
                                       offline_llm, write_results)


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
        repeats: int = 1, rounds: int = 1) -> dict:
    """Measure every configuration ``rounds`` times, in rounds (each runs every configuration
    once, the order reversed every other round, so that a drift of the machine's speed falls on
    both sides of a ratio); results are medians over rounds, ratios the median of each round's
    ratio with their range."""
    from transformers import AutoTokenizer

    from vllm_kvevict.eval.passkey import make_trial

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    covering = 1 << (prompt_tokens + new_tokens).bit_length()
    # (policy, budget, prompt tokens)
    configs = [("none", None, prompt_tokens)]
    for b in budgets:
        configs += [("streamingllm", b, prompt_tokens), ("arkvale", b, prompt_tokens),
                    ("none", None, b)]
    configs.append(("arkvale", covering, prompt_tokens))
    prompts = {n: make_trial(tokenizer, n, 0.5, "12345").prompt for n in {c[2] for c in configs}}
    per_round = []
    for index in range(rounds):
        measured = {}
        order = configs if index % 2 == 0 else configs[::-1]
        for policy, budget, tokens in tqdm(order, desc=f"latency, round {index + 1}/{rounds}"):
            llm = offline_llm(model_path, policy, budget)
            try:
                _decode_step_times(llm, prompts[tokens], 8, 1)  # warm-up
                times = _decode_step_times(llm, prompts[tokens], new_tokens, repeats)
            finally:
                close_llm(llm)
            measured[policy, budget, tokens] = {
                "policy": policy, "budget": budget, "prompt_tokens": tokens,
                "covers_context": budget == covering, "median_ms": 1000 * median(times),
                "steps": len(times), "p90_ms": 1000 * sorted(times)[int(0.9 * (len(times) - 1))]}
        per_round.append(with_ratios([measured[c] for c in configs]))
    rows = median_over_rounds(per_round)
    payload = {"environment": environment(model_path),
               "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                            "budgets": budgets, "covering_budget": covering, "repeats": repeats,
                            "rounds": rounds},
               "results": rows, **({"rounds": per_round} if rounds > 1 else {})}

    def ratio(r, key):
        if r[key] is None:
            return "-"
        if rounds == 1:
            return f"{r[key]:.2f}x"
        low, high = r[f"{key}_range"]
        return f"{r[key]:.2f}x ({low:.2f}-{high:.2f})"
    table = markdown_table(
        ["policy@budget", "prompt tokens", "median ms/token", "p90 ms/token", "vs none",
         "vs streamingllm@budget", "vs none on a ~budget prompt"],
        [[_name(r), r["prompt_tokens"], f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}",
          ratio(r, "ratio_to_none"), ratio(r, "ratio_to_streamingllm"),
          ratio(r, "ratio_to_none_short")] for r in rows])
    write_results(out_dir, "latency", payload,
                  f"Decode latency per token, one request, ~{prompt_tokens}-token prompt (none "
                  f"also on prompts of about each budget's length), {new_tokens} generated tokens "
                  f"(engine step times after the first token)."
                  + (f" Medians over {rounds} rounds (every configuration once per round, the "
                     f"order reversed every other round); ratios: the median of the rounds' "
                     f"ratios, their range in brackets." if rounds > 1 else "") + "\n\n"
                  + table)
    _plot(rows, out_dir)
    return payload


RATIOS = ("ratio_to_none", "ratio_to_streamingllm", "ratio_to_none_short")


def with_ratios(rows: list[dict]) -> list[dict]:
    """One round's rows (the first: none on the full prompt) with each row's ratios to it, to
    streamingllm at the row's budget and to none on a prompt of the budget's length (None where
    the round has no such row)."""
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_none"] = r["median_ms"] / base
        same = [q for q in rows if q["budget"] == r["budget"] and q["policy"] == "streamingllm"]
        short = [q for q in rows if q["policy"] == "none" and q["prompt_tokens"] == r["budget"]]
        r["ratio_to_streamingllm"] = r["median_ms"] / same[0]["median_ms"] if same else None
        r["ratio_to_none_short"] = r["median_ms"] / short[0]["median_ms"] if short else None
    return rows


def median_over_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Per configuration, the median over rounds of its times, and of each ratio (each taken
    within one round) with the ratio's range (``<ratio>_range``). One round: its rows as they
    are."""
    if len(rounds) == 1:
        return rounds[0]
    rows = []
    for runs in zip(*rounds):
        row = {key: runs[0][key] for key in ("policy", "budget", "prompt_tokens",
                                             "covers_context")}
        row["median_ms"] = median([run["median_ms"] for run in runs])
        row["p90_ms"] = median([run["p90_ms"] for run in runs])
        row["steps"] = sum(run["steps"] for run in runs)
        for key in RATIOS:
            values = [run[key] for run in runs]
            known = None not in values
            row[key] = median(values) if known else None
            row[f"{key}_range"] = (min(values), max(values)) if known else None
        rows.append(row)
    return rows


def _name(r) -> str:
    if r["covers_context"]:
        return label(r["policy"], r["budget"]) + " (covers context)"
    return label(r["policy"], r["budget"])


def _plot(rows, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{_name(r)}, {r['prompt_tokens']}-token prompt" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    ax.barh(names[::-1], [r["median_ms"] for r in rows][::-1], color="tab:orange")
    ax.set_xlabel("median ms per decode step")
    ax.set_title("decode latency")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/latency.png", dpi=110)
    plt.close(fig)
