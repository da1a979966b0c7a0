"""ArkVale's page traffic and digest quality on passkey prompts.

Per budget: page copies recalled per (request, layer, decode step), host store use, and how well
the digest ranking finds the pages exact attention weighs most
(:class:`vllm_kvevict.pages.SelectionProbe`: top-k overlap, and how often the single heaviest
unpinned page is among the digest's top-k).
"""
from __future__ import annotations

from tqdm import tqdm

from vllm_kvevict.bench.common import (close_llm, environment, markdown_table, offline_llm,
                                       write_results)


def run(model_path: str, out_dir: str, prompt_tokens: int, new_tokens: int, budgets: list[int],
        trials: int, digest: str = "cuboid-mean") -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_kvevict.engine.page_runtime import current_runtime
    from vllm_kvevict.eval.passkey import found, make_trials
    from vllm_kvevict.pages import SelectionProbe

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    depths = [(i + 0.5) / trials for i in range(trials)]
    batch = make_trials(tokenizer, prompt_tokens, trials, seed=7, depths=depths)
    rows = []
    for budget in tqdm(budgets, desc="recall"):
        llm = offline_llm(model_path, "arkvale", budget, kv_digest=digest)
        try:
            llm.generate(["warm up"], SamplingParams(max_tokens=2), use_tqdm=False)
            runtime = current_runtime()
            runtime.probe = probe = SelectionProbe()
            before = runtime.stats.recalled
            peak_bytes = 0
            hits = 0
            for trial in batch:  # one at a time: host use per request
                output = llm.generate([trial.prompt], SamplingParams(
                    temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)[0]
                hits += found(trial, output.outputs[0].text)
                peak_bytes = max(peak_bytes, runtime.store.used_bytes)
            recalled = runtime.stats.recalled - before
        finally:
            close_llm(llm)
        n = max(1, probe.selections)
        rows.append({"budget": budget, "selections": probe.selections,
                     "recalled_per_layer_step": recalled / n,
                     "top_k_overlap": probe.top_k_overlap / n, "top1_hit_rate": probe.top1_hits / n,
                     "host_mib_per_request": peak_bytes / 2**20, "passkey_found": hits,
                     "trials": trials})
    payload = {"environment": environment(model_path),
               "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                            "budgets": budgets, "trials": trials, "digest": digest},
               "results": rows}
    table = markdown_table(
        ["budget", "recalled pages / layer / step", "digest top-k overlap",
         "heaviest page in top-k", "host MiB / request", "passkey"],
        [[r["budget"], f"{r['recalled_per_layer_step']:.2f}", f"{100 * r['top_k_overlap']:.0f}%",
          f"{100 * r['top1_hit_rate']:.0f}%", f"{r['host_mib_per_request']:.0f}",
          f"{r['passkey_found']}/{r['trials']}"] for r in rows])
    write_results(out_dir, "recall", payload,
                  f"arkvale ({digest}) on ~{prompt_tokens}-token passkey prompts, {new_tokens} "
                  f"generated tokens each, one request at a time. Overlap and hit rate are over "
                  f"every (request, layer, decode step) selection.\n\n" + table)
    _plot(rows, out_dir)
    return payload


def _plot(rows, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    budgets = [str(r["budget"]) for r in rows]
    ax.plot(budgets, [100 * r["top_k_overlap"] for r in rows], "o-", label="top-k overlap %")
    ax.plot(budgets, [100 * r["top1_hit_rate"] for r in rows], "s-", label="heaviest page hit %")
    ax.set_xlabel("budget (tokens)")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.bar(budgets, [r["recalled_per_layer_step"] for r in rows], alpha=0.3, color="tab:gray")
    ax2.set_ylabel("recalled pages / layer / step")
    ax.legend(loc="lower right")
    ax.set_title("arkvale digest quality and recall traffic")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/recall.png", dpi=110)
    plt.close(fig)
