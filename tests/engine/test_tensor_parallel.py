"""ArkVale under tensor parallelism (TP=2, multiproc executor) on a tiny random-weight model.

The bundled model's 3 KV heads do not split over 2 ranks, so the ``tiny_llama`` fixture's 2-layer
Llama with 4 query and 2 KV heads is used. Each rank scores and recalls for its own KV head.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def test_tp2_covering_budget_matches_none_and_evicting_run_recalls(tiny_llama, tmp_path):
    out = tmp_path / "tp.json"
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    script = Path(__file__).with_name("tp_arkvale.py")
    result = subprocess.run([sys.executable, str(script), tiny_llama, str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = json.loads(out.read_text())
    assert runs["covering"]["tokens"] == runs["none"]["tokens"]
    assert all(len(tokens) == 48 for tokens in runs["evicting"]["tokens"])
    stats = runs["evicting"]["stats"]
    assert len(stats) == 2  # one entry per rank
    for rank in stats:
        assert rank["num_kv_heads"] == 1  # each rank holds its own KV head
        assert rank["backed_up"] > 0 and rank["recalled"] > 0
