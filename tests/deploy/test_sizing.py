"""docs/sizing.md: the worked examples' page counts are what the plugin computes.

Each case builds the KV-cache spec vLLM would give one worker (its KV heads and layers) and runs
the plugin's own sizing functions on it; the guide must quote the results.
"""
import pytest

from tests.deploy.conftest import REPO

GIB = 1 << 30
# name, layers per rank, KV heads per rank, head size, --kv-budget, --kv-host-space
CASES = [
    ("Llama-3.1-8B, one GPU", 32, 8, 128, 2048, 64),
    ("Llama-3.1-70B, TP=8 x PP=2", 40, 1, 128, 2048, 32),
    ("SmolLM2-135M, CPU", 30, 3, 64, 512, 4),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_worked_example_matches_the_plugin(case):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.engine.kv_spec import EvictingAttentionSpec
    from vllm_kvevict.engine.page_runtime import digest_bytes, host_pages_for
    from vllm_kvevict.policies import get_policy

    _, layers, kv_heads, head_size, budget, host_gib = case
    config = EvictionConfig(policy="arkvale", budget=budget, host_space_gib=host_gib)
    full = FullAttentionSpec(block_size=32, num_kv_heads=kv_heads, head_size=head_size,
                             dtype=torch.bfloat16)
    host_pages = host_pages_for(config, full.page_size_bytes, layers)
    spec = EvictingAttentionSpec.from_full_attention(full, config.layout(32), 32768, host_pages)
    resident = spec.layout.max_resident_pages
    guide = (REPO / "docs" / "sizing.md").read_text()
    assert f"R = {spec.budget_pages} + 1 = {resident} blocks" in guide
    assert f"= {host_pages} pages = {host_pages * 32} tokens" in guide
    digests = digest_bytes(spec, get_policy("arkvale"), layers, available_bytes=0)
    assert digests == pytest.approx(host_gib * GIB / 32, rel=1e-3)  # the guide's H/32
