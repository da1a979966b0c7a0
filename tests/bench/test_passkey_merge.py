"""Merging passkey/policies runs into one table (no engine)."""
import json

import pytest

from vllm_kvevict.bench.__main__ import main


def _run(path, cells, date):
    env = {"model": "m", "machine": "cpu", "device": "cpu", "vllm": "0.32.0", "torch": "2",
           "date": date}
    path.write_text(json.dumps({"environment": env, "settings": {"trials": len(cells[0]["found"])},
                                "cells": cells}))
    return str(path)


def _cell(policy, budget, length, found):
    return {"policy": policy, "budget": budget, "length": length, "found": found,
            "depths": [], "tokens": [], "accuracy": sum(found) / len(found)}


def test_merge_keeps_each_cells_trial_count(tmp_path):
    first = _run(tmp_path / "a.json", [_cell("arkvale", 512, 4000, [True, True, False, True, True]),
                                       _cell("none", None, 4000, [True] * 4 + [False])], "d1")
    second = _run(tmp_path / "b.json", [_cell("arkvale", 512, 7000, [True, False, False]),
                                        _cell("h2o", 1024, 7000, [False, False, True])], "d2")
    out = tmp_path / "out"
    assert main(["policies", "--merge", first, "--merge", second, "--out", str(out)]) == 0
    table = (out / "policies.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "budget" not in line]
    assert rows == ["| none | 80% (4/5) | not run |",
                    "| arkvale@512 | 80% (4/5) | 33% (1/3) |",
                    "| h2o@1024 | not run | 33% (1/3) |"]
    merged = json.loads((out / "policies.json").read_text())
    assert [m["date"] for m in merged["settings"]["merged_from"]] == ["d1", "d2"]
    assert (out / "policies.png").stat().st_size > 1000
    # Merging a merge lists the original runs, not a nested record.
    third = _run(tmp_path / "c.json", [_cell("tova", 512, 4000, [True])], "d3")
    again = tmp_path / "again"
    assert main(["policies", "--merge", str(out / "policies.json"), "--merge", third,
                 "--out", str(again)]) == 0
    merged = json.loads((again / "policies.json").read_text())
    assert [m["date"] for m in merged["settings"]["merged_from"]] == ["d1", "d2", "d3"]


def test_merge_refuses_a_cell_from_two_runs(tmp_path, capsys):
    cell = _cell("tova", 512, 4000, [True])
    first = _run(tmp_path / "a.json", [cell], "d1")
    second = _run(tmp_path / "b.json", [cell], "d2")
    with pytest.raises(SystemExit):
        main(["policies", "--merge", first, "--merge", second, "--out", str(tmp_path)])
    assert "tova@512 at ~4000 tokens is in both" in capsys.readouterr().err
    assert not (tmp_path / "policies.md").exists()


def test_merge_is_only_for_passkey_tables(tmp_path):
    with pytest.raises(SystemExit):
        main(["latency", "--merge", "x.json", "--out", str(tmp_path)])
