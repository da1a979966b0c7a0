"""Passkey retrieval accuracy per policy, budget, prompt length and needle depth."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from vllm_kvevict.bench.common import (annotate_percent, close_llm, environment, label,
                                       markdown_table, offline_llm, write_results)
from vllm_kvevict.paging import cdiv


def run(model_path: str, out_dir: str, lengths: list[int], budgets: list[int],
        policies: list[str], trials: int, seed: int = 0, name: str = "passkey",
        engine_kwargs: dict | None = None) -> dict:
    """Writes ``{out_dir}/{name}.{json,md,png}``; ``engine_kwargs`` go to every engine."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_kvevict.eval.passkey import found, make_trials

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    depths = [i / max(1, trials - 1) for i in range(trials)]
    engine_kwargs = dict(engine_kwargs or {})
    trial_sets = {n: make_trials(tokenizer, n, trials, seed=seed, depths=depths) for n in lengths}
    configs = [(p, None) if p == "none" else (p, b) for p in policies
               for b in ([None] if p == "none" else budgets)]
    cells = []
    for policy, budget in tqdm(configs, desc="passkey engines"):
        llm = offline_llm(model_path, policy, budget, **engine_kwargs)
        try:
            for n in tqdm(lengths, desc=label(policy, budget), leave=False):
                batch = trial_sets[n]
                outputs = llm.generate([t.prompt for t in batch],
                                       SamplingParams(temperature=0, max_tokens=8),
                                       use_tqdm=False)
                hits = [found(t, o.outputs[0].text) for t, o in zip(batch, outputs)]
                cells.append({"policy": policy, "budget": budget, "length": n,
                              "tokens": [t.num_tokens for t in batch], "depths": depths,
                              "found": hits, "accuracy": sum(hits) / len(hits)})
        finally:
            close_llm(llm)
    payload = {"environment": environment(model_path),
               "settings": {"lengths": lengths, "budgets": budgets, "policies": policies,
                            "trials": trials, "seed": seed, "max_tokens": 8, "greedy": True,
                            "engine_kwargs": engine_kwargs},
               "cells": cells}
    write_results(out_dir, name, payload, _table(cells, lengths))
    _plot(cells, lengths, budgets, policies, out_dir, name)
    return payload


def merge(out_dir: str, name: str, sources: list[str]) -> dict:
    """Writes ``{out_dir}/{name}.{json,md,png}`` from the cells of earlier runs' JSON files.

    Each (policy, budget, length) cell must come from exactly one source; cells keep their own
    trial counts, which the table shows.
    """
    payloads = [json.loads(Path(source).read_text()) for source in sources]
    cells, origin = [], {}
    for source, payload in zip(sources, payloads):
        for c in payload["cells"]:
            key = (c["policy"], c["budget"], c["length"])
            if key in origin:
                raise ValueError(f"{label(c['policy'], c['budget'])} at ~{c['length']} tokens is "
                                 f"in both {origin[key]} and {source}")
            origin[key] = source
            cells.append(c)
    policies = sorted({c["policy"] for c in cells}, key=lambda p: (p != "none", _first(cells, p)))
    rank = {p: i for i, p in enumerate(policies)}
    cells.sort(key=lambda c: (rank[c["policy"]], c["budget"] or 0, c["length"]))
    lengths = sorted({c["length"] for c in cells})
    budgets = sorted({c["budget"] for c in cells if c["budget"] is not None})
    merged = {"environment": payloads[-1]["environment"],
              "settings": {"merged_from": [run for p in payloads for run in
                                           _runs(p["settings"], p["environment"].get("date"))]},
              "cells": cells}
    write_results(out_dir, name, merged, _table(cells, lengths))
    _plot(cells, lengths, budgets, policies, out_dir, name)
    return merged


def _runs(settings: dict, date: str | None) -> list[dict]:
    """The settings of the runs behind a result: itself, or the runs earlier merges joined."""
    if "merged_from" not in settings:
        return [{"date": date, **settings}]
    return [run for inner in settings["merged_from"] for run in _runs(inner, inner.get("date"))]


def _first(cells, policy) -> int:
    return next(i for i, c in enumerate(cells) if c["policy"] == policy)


def _table(cells, lengths) -> str:
    by_config = defaultdict(dict)
    for c in cells:
        by_config[label(c["policy"], c["budget"])][c["length"]] = c

    def cell(c) -> str:
        if c is None:
            return "not run"
        return f"{100 * c['accuracy']:.0f}% ({sum(c['found'])}/{len(c['found'])})"

    rows = [[name] + [cell(by_config[name].get(n)) for n in lengths] for name in by_config]
    return ("Passkey accuracy (5-digit key, greedy, exact match), needle depths spread over "
            "0..1.\n\n" + markdown_table(["policy@budget"] + [f"~{n} tokens" for n in lengths],
                                          rows))


def _plot(cells, lengths, budgets, policies, out_dir, name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = ["none"] + [p for p in policies if p != "none"]
    ncols = min(4, len(panels))
    nrows = cdiv(len(panels), ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, policy in zip(axes.flat, panels):
        rows = [None] if policy == "none" else budgets
        grid = np.full((len(rows), len(lengths)), np.nan)
        for c in cells:
            if c["policy"] == policy:
                grid[rows.index(c["budget"]), lengths.index(c["length"])] = c["accuracy"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(rows)), ["full" if r is None else str(r) for r in rows])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("budget (tokens)")
        ax.set_title(policy)
        annotate_percent(ax, grid)
    fig.suptitle("passkey accuracy (%)")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}.png", dpi=110)
    plt.close(fig)
