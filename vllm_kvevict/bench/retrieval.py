"""Retrieval accuracy on natural prose per policy, budget, task and prompt length."""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from tqdm import tqdm

from vllm_kvevict.bench.common import (BLOCK_SIZE, SettingError, annotate_percent, close_llm,
                                       environment, label, markdown_table, offline_llm,
                                       write_results)
from vllm_kvevict.bench.passkey import _runs


def run(model_path: str, out_dir: str, lengths: list[int], budgets: list[int],
        policies: list[str], tasks: list[str], trials: int, seed: int = 0,
        name: str = "retrieval", engine_kwargs: dict | None = None) -> dict:
    """Writes ``{out_dir}/{name}.{json,md,png}``; ``engine_kwargs`` go to every engine.

    One engine per (policy, budget); for each length, every task's trials go in one batched
    greedy ``generate`` call.
    """
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_kvevict.eval import retrieval

    unknown = [t for t in tasks if t not in retrieval.TASKS]
    if unknown:
        raise SettingError(f"unknown retrieval tasks {unknown}; known: "
                           f"{', '.join(retrieval.TASKS)}")
    engine_kwargs = dict(engine_kwargs or {})
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batches = {n: [t for task in tasks for t in retrieval.make_trials(tokenizer, task, n, trials,
                                                                       seed=seed)]
               for n in lengths}
    spans = {id(t): retrieval.answer_pages(tokenizer, t, BLOCK_SIZE)
             for batch in batches.values() for t in batch}
    configs = [(p, None) if p == "none" else (p, b) for p in policies
               for b in ([None] if p == "none" else budgets)]
    cells = []
    for policy, budget in tqdm(configs, desc="retrieval engines"):
        llm = offline_llm(model_path, policy, budget, **engine_kwargs)
        try:
            for n in tqdm(lengths, desc=label(policy, budget), leave=False):
                batch = batches[n]
                params = [SamplingParams(temperature=0, max_tokens=retrieval.max_tokens(t.task))
                          for t in batch]
                start = time.perf_counter()
                outputs = llm.generate([t.prompt for t in batch], params, use_tqdm=False)
                seconds = time.perf_counter() - start
                texts = [o.outputs[0].text for o in outputs]
                for task in tasks:
                    rows = [(t, text) for t, text in zip(batch, texts) if t.task == task]
                    cells.append(_cell(policy, budget, task, n, rows, seconds, retrieval,
                                       [spans[id(t)] for t, _ in rows]))
        finally:
            close_llm(llm)
    payload = {"environment": environment(model_path),
               "settings": {"lengths": lengths, "budgets": budgets, "policies": policies,
                            "tasks": tasks, "trials": trials, "seed": seed, "greedy": True,
                            "max_tokens": {t: retrieval.max_tokens(t) for t in tasks},
                            "engine_kwargs": engine_kwargs},
               "cells": cells}
    _write(out_dir, name, payload)
    return payload


def _cell(policy, budget, task, length, rows, seconds, retrieval, answer_pages) -> dict:
    found = [retrieval.score(t, text) for t, text in rows]
    partial = [retrieval.partial(t, text) for t, text in rows]
    return {"policy": policy, "budget": budget, "task": task, "length": length,
            "tokens": [t.num_tokens for t, _ in rows],
            "needles": [list(t.needles) for t, _ in rows],
            "depths": [list(t.depths) for t, _ in rows],
            "sources": [t.source for t, _ in rows], "answers": [list(t.answers) for t, _ in rows],
            "completions": [text for _, text in rows], "found": found, "partial": partial,
            "answer_pages": answer_pages,
            "accuracy": sum(found) / len(found), "partial_mean": sum(partial) / len(partial),
            "batch_generate_s": round(seconds, 2)}


def merge(out_dir: str, name: str, sources: list[str]) -> dict:
    """Writes ``{out_dir}/{name}.{json,md,png}`` from the cells of earlier runs' JSON files.

    Each (policy, budget, task, length) cell must come from exactly one source. Single-needle
    cells of runs made before ``answer_pages`` was recorded get it from their trials, made
    again from the run's seed (with the bundled model's tokenizer).
    """
    payloads = [json.loads(Path(source).read_text()) for source in sources]
    cells, origin = [], {}
    for source, payload in zip(sources, payloads):
        seed = _seed(payload["settings"])
        for c in payload["cells"]:
            key = (c["policy"], c["budget"], c["task"], c["length"])
            if key in origin:
                raise ValueError(f"{label(c['policy'], c['budget'])} {c['task']} at "
                                 f"~{c['length']} tokens is in both {origin[key]} and {source}")
            origin[key] = source
            cells.append(c)
            if "answer_pages" not in c and c["task"] in _SINGLE and seed is not None:
                _add_answer_pages(c, seed)
    merged = {"environment": payloads[-1]["environment"],
              "settings": {"merged_from": [run for p in payloads for run in
                                           _runs(p["settings"], p["environment"].get("date"))]},
              "cells": cells}
    _write(out_dir, name, merged)
    return merged


_SINGLE = ("needle-last", "needle-first")


def _seed(settings: dict) -> int | None:
    """The trials' seed of a run, or of every run merged into it (None if unknown or mixed)."""
    seeds = {run.get("seed") for run in settings.get("merged_from", [settings])}
    return seeds.pop() if len(seeds) == 1 else None


def _add_answer_pages(cell: dict, seed: int) -> None:
    answers, pages = _trial_pages(cell["task"], cell["length"], len(cell["found"]), seed)
    if answers == cell.get("answers"):
        cell["answer_pages"] = pages


@functools.lru_cache(maxsize=None)
def _trial_pages(task: str, length: int, num_trials: int, seed: int) -> tuple[list, list]:
    """The answers of a run's trials and the pages each spans, made again (once per cell key,
    shared by every policy's cell)."""
    from vllm_kvevict.eval import retrieval

    tokenizer = _bundled_tokenizer()
    trials = retrieval.make_trials(tokenizer, task, length, num_trials, seed=seed)
    return ([list(t.answers) for t in trials],
            [retrieval.answer_pages(tokenizer, t, BLOCK_SIZE) for t in trials])


@functools.lru_cache(maxsize=1)
def _bundled_tokenizer():
    from transformers import AutoTokenizer

    from vllm_kvevict.bench.common import bundled_model

    return AutoTokenizer.from_pretrained(bundled_model())


def _write(out_dir, name, payload) -> None:
    from vllm_kvevict.eval.retrieval import TASKS

    cells = payload["cells"]
    configs = sorted({(c["policy"], c["budget"]) for c in cells},
                     key=lambda pb: (pb[0] != "none", _first(cells, pb), pb[1] or 0))
    tasks = [t for t in TASKS if any(c["task"] == t for c in cells)]
    lengths = sorted({c["length"] for c in cells})
    write_results(out_dir, name, payload, _table(cells, configs, tasks, lengths))
    _plot(cells, configs, tasks, lengths, out_dir, name)


def _first(cells, config) -> int:
    return next(i for i, c in enumerate(cells) if (c["policy"], c["budget"]) == config)


def _table(cells, configs, tasks, lengths) -> str:
    by_key = {(c["policy"], c["budget"], c["task"], c["length"]): c for c in cells}

    def cell(c) -> str:
        if c is None:
            return "not run"
        text = f"{100 * c['accuracy']:.0f}% ({sum(c['found'])}/{len(c['found'])})"
        if c["task"] in _PARTIAL:
            text += f", {100 * c['partial_mean']:.0f}% of {_PARTIAL[c['task']]}"
        return text

    columns = [(task, n) for task in tasks for n in lengths]
    rows = [[label(p, b)] + [cell(by_key.get((p, b, task, n))) for task, n in columns]
            for p, b in configs]
    return ("Retrieval accuracy on natural prose (greedy, exact match; multi-needle: all three "
            "numbers in the asked order, then the share of needles named; var-chain: the chain's "
            "number, then the share of its links named in order). Haystacks rotate over the "
            "pydoc, docstrings and narrative sources; needle depths spread over 0..1.\n\n"
            + markdown_table(["policy@budget"] + [f"{task} ~{n}" for task, n in columns], rows)
            + _boundary_table(cells, configs))


def _boundary_table(cells, configs) -> str:
    """Single-needle trials split by whether the answer's tokens cross a page boundary."""
    counts = {}
    for c in cells:
        if c["task"] not in _SINGLE or "answer_pages" not in c:
            continue
        split = counts.setdefault((c["policy"], c["budget"]), [0, 0, 0, 0])
        for found, pages in zip(c["found"], c["answer_pages"]):
            crossing = pages[0] is not None and pages[0] > 1
            split[0 if crossing else 2] += found
            split[1 if crossing else 3] += 1
    if not counts:
        return ""
    rows = [[label(*pb)] + [f"{counts[pb][i]}/{counts[pb][i + 1]}" for i in (0, 2)]
            for pb in configs if pb in counts]
    return (f"\n\nSingle needle (both tasks, all lengths), split by whether the answer's "
            f"tokens cross a {BLOCK_SIZE}-token page boundary:\n\n"
            + markdown_table(["policy@budget", "answer across pages: found",
                              "answer within a page: found"], rows))


_PARTIAL = {"multi-needle": "needles", "var-chain": "links"}


def _plot(cells, configs, tasks, lengths, out_dir, name) -> None:
    """One heat map per task: exact accuracy, or for multi-needle and var-chain the share of
    needles or links found (their exact scores are mostly zero on the bundled model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = 2.5 + 1.1 * len(tasks) * max(2, len(lengths))
    fig, axes = plt.subplots(1, len(tasks), figsize=(width, 1.5 + 0.35 * len(configs)),
                             squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        key = "partial_mean" if task in _PARTIAL else "accuracy"
        grid = np.full((len(configs), len(lengths)), np.nan)
        for c in cells:
            if c["task"] == task:
                grid[configs.index((c["policy"], c["budget"])), lengths.index(c["length"])] = (
                    c[key])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(configs)), [label(p, b) for p, b in configs])
        ax.set_xlabel("prompt tokens")
        ax.set_title(task if task not in _PARTIAL else f"{task}\n(% of {_PARTIAL[task]})",
                     fontsize=10)
        annotate_percent(ax, grid)
    fig.suptitle("retrieval on natural prose (% exact unless stated)")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}.png", dpi=110)
    plt.close(fig)
