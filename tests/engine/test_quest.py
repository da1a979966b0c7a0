"""Quest on the real engine: every block stays resident, attention reads only the selection."""
import pytest

from tests.engine.conftest import block_manager, run_checking_decodes

pytestmark = pytest.mark.engine


def test_all_blocks_resident_attention_over_top_k_and_passkeys_found(llm_factory, model_path):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_kvevict.engine.page_runtime import current_runtime
    from vllm_kvevict.eval.passkey import found, make_trials

    llm = llm_factory("quest", 512)
    manager = block_manager(llm)
    trials = make_trials(AutoTokenizer.from_pretrained(model_path), 2000, 3, seed=11,
                         depths=[0.2, 0.5, 0.8])
    params = SamplingParams(temperature=0, max_tokens=8)
    for i, trial in enumerate(trials):
        llm.llm_engine.add_request(f"q{i}", trial.prompt, params)

    def nothing_freed(internal_id, request):
        needed = -(-request.num_computed_tokens // manager.block_size)
        assert manager.num_resident_blocks(internal_id) >= needed

    texts, checked = run_checking_decodes(llm, nothing_freed)
    assert checked > 0
    runtime = current_runtime()
    assert runtime.stats.selections > 0 and runtime.stats.recalled == 0
    assert runtime.store.used_pages == 0  # no host copies
    # Attention reads 16 of ~63 pages per step; most keys are still found.
    assert sum(found(t, texts[f"q{i}"]) for i, t in enumerate(trials)) >= 2, texts
