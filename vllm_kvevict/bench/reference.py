"""Page-level attention-statistics policies against their token-level references.

The bundled model runs in plain transformers (no vLLM) over passkey prompts followed by the
model's own greedy answer; a custom attention function records every layer's post-RoPE queries
and keys. On those same inputs, per sampled layer, :mod:`vllm_kvevict.algorithms.token_reference`
replays each policy token by token per KV head (the papers' definition) and page by page with the
plugin's scoring (the engine's decision), and reports the share of the reference's kept tokens that
the page-level version keeps too, and whether the needle's tokens survive in each.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from vllm_kvevict.bench.common import environment, markdown_table, write_results


def run(model_path: str, out_dir: str, prompt_tokens: int, answer_tokens: int, budgets: list[int],
        policies: list[str], trials: int, layers: list[int], page_size: int = 32,
        sink: int = 64, window: int = 64, observation_window: int = 32) -> dict:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vllm_kvevict.algorithms.token_reference import (kept_overlap, page_level_keep,
                                                         token_level_keep)
    from vllm_kvevict.eval.passkey import make_trials
    from vllm_kvevict.policies import get_policy

    captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:  # [1, heads, T, d] -> [T, heads, d]
            captured[module.layer_idx] = (query[0].transpose(0, 1).float().clone(),
                                          key[0].transpose(0, 1).float().clone(), module.scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("kvevict_capture", capture)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    depths = [(i + 0.5) / trials for i in range(trials)]
    rows = []
    for trial in tqdm(make_trials(tokenizer, prompt_tokens, trials, seed=3, depths=depths),
                      desc="reference trials"):
        prompt = tokenizer(trial.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            model.config._attn_implementation = "sdpa"
            sequence = model.generate(prompt, max_new_tokens=answer_tokens, do_sample=False,
                                      min_new_tokens=answer_tokens)
            captured.clear()
            model.config._attn_implementation = "kvevict_capture"
            model(sequence)
        prompt_len = prompt.shape[1]
        needle = _needle_positions(tokenizer, prompt[0], trial.passkey)
        for budget in budgets:
            for name in policies:
                policy = get_policy(name)
                overlaps, token_needle, page_needle = [], [], []
                for layer in layers:
                    queries, keys, scale = captured[layer]
                    args = (queries, keys, prompt_len, budget, sink, window, observation_window,
                            scale)
                    token_kept = token_level_keep(name, *args)
                    page_kept = page_level_keep(policy, *args, page_size=page_size)
                    overlaps.append(kept_overlap(token_kept, page_kept))
                    token_needle.append(float(token_kept[:, needle].float().mean()))
                    page_needle.append(float(page_kept[:, needle].float().mean()))
                rows.append({"policy": name, "budget": budget, "depth": trial.depth,
                             "prompt_tokens": prompt_len, "layers": layers,
                             "kept_overlap": overlaps, "needle_kept_token_level": token_needle,
                             "needle_kept_page_level": page_needle})
    summary = _summary(rows, policies, budgets)
    payload = {"environment": environment(model_path),
               "settings": {"prompt_tokens": prompt_tokens, "answer_tokens": answer_tokens,
                            "budgets": budgets, "policies": policies, "trials": trials,
                            "layers": layers, "page_size": page_size, "sink": sink,
                            "window": window, "observation_window": observation_window},
               "summary": summary, "results": rows}
    write_results(out_dir, "reference", payload, _table(summary, prompt_tokens, answer_tokens))
    _plot(summary, policies, budgets, out_dir)
    return payload


def _needle_positions(tokenizer, prompt_ids: torch.Tensor, passkey: str) -> list[int]:
    """Prompt positions of the tokens that spell the passkey (its first occurrence)."""
    pieces = [tokenizer.decode([int(t)]) for t in prompt_ids]
    text, starts = "", []
    for piece in pieces:
        starts.append(len(text))
        text += piece
    begin = text.index(passkey)
    end = begin + len(passkey)
    return [i for i, s in enumerate(starts) if begin <= s < end or s < begin < s + len(pieces[i])]


def _summary(rows, policies, budgets) -> list[dict]:
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    out = []
    for budget in budgets:
        for name in policies:
            cell = [r for r in rows if r["policy"] == name and r["budget"] == budget]
            out.append({"policy": name, "budget": budget,
                        "kept_overlap": mean([mean(r["kept_overlap"]) for r in cell]),
                        "needle_kept_token_level": mean([mean(r["needle_kept_token_level"])
                                                         for r in cell]),
                        "needle_kept_page_level": mean([mean(r["needle_kept_page_level"])
                                                        for r in cell])})
    return out


def _table(summary, prompt_tokens, answer_tokens) -> str:
    rows = [[s["policy"], s["budget"], f"{100 * s['kept_overlap']:.0f}%",
             f"{100 * s['needle_kept_token_level']:.0f}%",
             f"{100 * s['needle_kept_page_level']:.0f}%"] for s in summary]
    return ("Token-level reference vs page-level policy on the same inputs "
            f"(~{prompt_tokens}-token passkey prompts + {answer_tokens} answer tokens, bundled "
            "model in transformers). "
            "Overlap: share of the reference's kept tokens the page-level version keeps, mean "
            "over sampled layers, KV heads and trials. Needle kept: share of the passkey's "
            "tokens still in the cache after the last step.\n\n"
            + markdown_table(["policy", "budget", "kept overlap", "needle kept (token level)",
                              "needle kept (page level)"], rows))


def _plot(summary, policies, budgets, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(budgets)
    for i, budget in enumerate(budgets):
        values = [next(s["kept_overlap"] for s in summary
                       if s["policy"] == p and s["budget"] == budget) for p in policies]
        ax.bar([j + i * width for j in range(len(policies))], values, width,
               label=f"budget {budget}")
    ax.set_xticks([j + width * (len(budgets) - 1) / 2 for j in range(len(policies))], policies)
    ax.set_ylim(0, 1)
    ax.set_ylabel("kept-token overlap with the reference")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out_dir}/reference.png", dpi=110)
    plt.close(fig)
