"""Merging retrieval runs into one table, and engine keywords from --set (no engine)."""
import json

import pytest

from vllm_kvevict.bench.__main__ import SETTINGS, _parse, main


def _run(path, cells, date):
    env = {"model": "m", "machine": "cpu", "device": "cpu", "vllm": "0.32.0", "torch": "2",
           "date": date}
    path.write_text(json.dumps({"environment": env, "settings": {"trials": 2}, "cells": cells}))
    return str(path)


def _cell(policy, budget, task, length, found, partial=None, answer_pages=None):
    partial = partial or [float(f) for f in found]
    cell = {"policy": policy, "budget": budget, "task": task, "length": length, "found": found,
            "partial": partial, "accuracy": sum(found) / len(found),
            "partial_mean": sum(partial) / len(partial)}
    return cell if answer_pages is None else {**cell, "answer_pages": answer_pages}


def test_merge_joins_tasks_and_lengths(tmp_path):
    first = _run(tmp_path / "a.json", [_cell("none", None, "needle-last", 3000, [True, True],
                                             answer_pages=[[2], [1]]),
                                       _cell("none", None, "multi-needle", 3000, [False, True],
                                             [2 / 3, 1.0])], "d1")
    second = _run(tmp_path / "b.json", [_cell("arkvale", 512, "needle-last", 3000,
                                              [False, True], answer_pages=[[2], [1]])], "d2")
    out = tmp_path / "out"
    assert main(["retrieval", "--merge", first, "--merge", second, "--out", str(out)]) == 0
    lines = (out / "retrieval.md").read_text().splitlines()
    assert "| policy@budget | needle-last ~3000 | multi-needle ~3000 |" in lines
    assert "| none | 100% (2/2) | 50% (1/2), 83% of needles |" in lines
    assert "| arkvale@512 | 50% (1/2) | not run |" in lines
    # single needle split by whether the answer crosses a page boundary (first trial: yes)
    assert "| policy@budget | answer across pages: found | answer within a page: found |" in lines
    assert "| none | 1/1 | 1/1 |" in lines and "| arkvale@512 | 0/1 | 1/1 |" in lines
    merged = json.loads((out / "retrieval.json").read_text())
    assert [m["date"] for m in merged["settings"]["merged_from"]] == ["d1", "d2"]
    assert (out / "retrieval.png").stat().st_size > 1000


def test_merge_refuses_a_cell_from_two_runs(tmp_path, capsys):
    cell = _cell("tova", 512, "var-chain", 6000, [True])
    first = _run(tmp_path / "a.json", [cell], "d1")
    second = _run(tmp_path / "b.json", [cell], "d2")
    with pytest.raises(SystemExit):
        main(["retrieval", "--merge", first, "--merge", second, "--out", str(tmp_path)])
    assert "tova@512 var-chain at ~6000 tokens is in both" in capsys.readouterr().err


def test_engine_kwargs_parse_as_literals():
    like = SETTINGS["retrieval"][0]["engine_kwargs"]
    assert _parse("kv_top_k_tokens:64,kv_digest:minmax,flag:True", like) == {
        "kv_top_k_tokens": 64, "kv_digest": "minmax", "flag": True}
