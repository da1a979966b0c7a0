"""The CI-sized soak (``bench soak --quick``): no server errors, nothing left behind, covered
greedy outputs equal to ``none``'s up to near-ties."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import report

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def soak(tmp_path_factory, model_path):
    out = tmp_path_factory.mktemp("soak")
    result = subprocess.run([sys.executable, "-m", "vllm_kvevict.bench", "soak", "--quick",
                             "--out", str(out)], env=dict(os.environ), capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "soak.png").stat().st_size > 1000
    assert "| arkvale@192" in (out / "soak.md").read_text()
    return json.loads((out / "soak.json").read_text())


def test_the_quick_mix_covers_every_kind_of_request(soak):
    mix = soak["mix"]
    for kind in ("chat", "stream", "n2", "stop", "max_tokens_1", "disconnect", "abort", "bad",
                 "long_burst", "covered_by_budget"):
        assert mix[kind] >= 1, kind
    assert [r["policy"] for r in soak["results"]] == ["none", "arkvale", "h2o"]


def test_no_server_errors_and_bad_input_gets_4xx(soak):
    for r in soak["results"]:
        assert r["submitted"] == soak["settings"]["num_requests"], r["policy"]
        assert r["server_errors"] == 0 and not r["crashed"] and r["drained"], r
        assert r["good_rejected"] == 0, r["policy"]
        assert r["bad_rejected_4xx"] == r["bad_requests"] >= 1, r["policy"]
        assert r["outcomes"]["completed"] >= r["submitted"] // 2, r["outcomes"]
        assert r["latency_p50_s"] > 0
    assert sum(r["preemptions"] for r in soak["results"]) > 0  # the pool overflowed


def test_nothing_is_left_behind(soak):
    for r in soak["results"]:
        assert r["plugin_requests_after"] == 0 and r["host_bytes_after"] == 0, r["state_after"]
        after = r["scheduler_after"]
        assert after["requests"] == 0 and after["requests_with_blocks"] == 0, after
        assert after["blocks_in_use"] == 0 and after["host_reserved_pages"] == 0, after
    arkvale = next(r for r in soak["results"] if r["policy"] == "arkvale")
    host = arkvale["scheduler_after"]
    assert host["host_pages"] == soak["settings"]["host_pages"]
    assert host["host_full_refusals"] > 0  # the host store filled: the scheduler waited
    assert arkvale["peak_host_mib"] > 0


def test_covered_greedy_outputs_equal_none_up_to_near_ties(soak):
    for r in soak["results"]:
        assert r["covered_compared"] >= 10, r["policy"]
        assert r["beyond_tie"] == 0, r["mismatches"]
        report(f"soak --quick {r['policy']}: {r['equal_to_none']}/{r['covered_compared']} covered "
               f"greedy requests equal to none, {r['near_tie']} differ at a near-tie "
               f"(max gap {r['max_gap_nats']:.3f} nats); {r['preemptions']} preemptions")
