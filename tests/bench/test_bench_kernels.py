"""Smoke test: the kernel benchmark runs on CPU (Triton interpreter) and writes its files."""
import json
import subprocess
import sys


def test_kernel_benchmark_quick(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vllm_kvevict.bench", "kernels", "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads((tmp_path / "kernels.json").read_text())
    assert payload["environment"]["timings_meaningful"] is False  # no GPU here
    [row] = payload["results"]
    assert (row["context"], row["batch"], row["budget"]) == (256, 2, 64)
    assert all(row[k] > 0 for k in ("sparse_ms", "dense_ms", "sdpa_ms", "scoring_ms"))
    assert "not kernel timings" in (tmp_path / "kernels.md").read_text()
    assert (tmp_path / "kernels.png").stat().st_size > 1000
