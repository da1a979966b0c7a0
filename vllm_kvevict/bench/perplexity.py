"""Teacher-forced perplexity of a long natural text under each policy, through vLLM decode steps.

The first ``prefix`` tokens are the prompt (prefilled with full attention); every later token is
forced through a decode step (:mod:`vllm_kvevict.bench.forced`), so eviction, selection and recall
run exactly as when generating. Perplexity is over the forced tokens.
"""
from __future__ import annotations

import math
from pathlib import Path

from tqdm import tqdm

from vllm_kvevict.bench.common import (bar_plot, close_llm, environment, label,
                                       markdown_table, offline_llm, write_results)

TEXT_CANDIDATES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3",
                   "/usr/share/common-licenses/Apache-2.0"]


def long_text(tokenizer, min_tokens: int) -> tuple[str, str]:
    """A natural-language text of at least ``min_tokens`` tokens found on this machine: the
    system's GPL text, else the longest LICENSE file of the installed Python packages."""
    import site
    import sysconfig

    candidates = [Path(p) for p in TEXT_CANDIDATES]
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    for root in roots:
        candidates += sorted(Path(root).glob("*.dist-info/LICENSE*"),
                             key=lambda p: -p.stat().st_size)[:20]
    for path in candidates:
        if path.is_file():
            text = path.read_text(errors="ignore")
            if len(tokenizer.encode(text)) >= min_tokens:
                return str(path), text
    raise RuntimeError(f"no text of {min_tokens} tokens found for the perplexity benchmark")


def run(model_path: str, out_dir: str, num_tokens: int, prefix: int, budgets: list[int],
        policies: list[str]) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_kvevict.bench.forced import FORCED_TOKENS_KEY, ForcedTokens

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    source, text = long_text(tokenizer, num_tokens)
    ids = tokenizer.encode(text)[:num_tokens]
    prompt, forced = ids[:prefix], ids[prefix:]
    params = SamplingParams(temperature=0, max_tokens=len(forced), ignore_eos=True, logprobs=0,
                            extra_args={FORCED_TOKENS_KEY: forced})
    configs = [(p, None) if p == "none" else (p, b) for p in policies
               for b in ([None] if p == "none" else budgets)]
    rows, payload = [], {}
    for policy, budget in tqdm(configs, desc="perplexity"):
        llm = offline_llm(model_path, policy, budget, logits_processors=[ForcedTokens])
        try:
            output = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params,
                                  use_tqdm=False)[0].outputs[0]
        finally:
            close_llm(llm)
        if list(output.token_ids) != forced:
            raise RuntimeError(f"{label(policy, budget)}: forced decoding diverged")
        logprobs = [step[token].logprob for step, token in zip(output.logprobs, forced)]
        nll = -sum(logprobs) / len(logprobs)
        rows.append({"policy": policy, "budget": budget, "perplexity": math.exp(nll),
                     "mean_nll": nll, "forced_tokens": len(forced)})
        # Rewritten after every config, so a long run that is stopped keeps what it measured.
        payload = _write(rows, out_dir, model_path, source, len(ids), prefix, budgets, policies)
    return payload


def _write(rows, out_dir, model_path, source, num_tokens, prefix, budgets, policies) -> dict:
    base = next((r["perplexity"] for r in rows if r["policy"] == "none"), None)
    payload = {"environment": environment(model_path),
               "settings": {"text": source, "num_tokens": num_tokens, "prefix": prefix,
                            "budgets": budgets, "policies": policies},
               "results": rows}
    table = markdown_table(
        ["policy@budget", "perplexity", "vs none"],
        [[label(r["policy"], r["budget"]), f"{r['perplexity']:.3f}",
          f"{r['perplexity'] / base:.3f}x" if base else "-"] for r in rows])
    write_results(out_dir, "perplexity", payload,
                  f"Teacher-forced perplexity of `{source}` ({num_tokens} tokens, the first "
                  f"{prefix} as prompt, the rest forced through decode steps).\n\n" + table)
    _plot(rows, out_dir)
    return payload


def _plot(rows, out_dir) -> None:
    bar_plot([label(r["policy"], r["budget"]) for r in rows], [r["perplexity"] for r in rows],
             "perplexity", "teacher-forced perplexity", f"{out_dir}/perplexity.png", "tab:blue")
