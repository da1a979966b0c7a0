"""h2o, tova, roco, snapkv, lra and lfa on the real engine: per-layer page eviction within the
budget."""
import pytest

from tests.conftest import report
from tests.engine.conftest import block_manager, close_llm, make_llm, run_checking_decodes

pytestmark = pytest.mark.engine

BUDGET = 512
TRIALS = 2
PROMPT_TOKENS = 1500


@pytest.mark.parametrize("policy", ["h2o", "tova", "roco", "snapkv", "lra", "lfa"])
def test_resident_blocks_stay_within_budget_while_pages_are_evicted(model_path, policy):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_kvevict.engine.page_runtime import current_runtime
    from vllm_kvevict.eval.passkey import found, make_trials

    llm = make_llm(model_path, policy, BUDGET)
    try:
        manager = block_manager(llm)
        trials = make_trials(AutoTokenizer.from_pretrained(model_path), PROMPT_TOKENS, TRIALS,
                             seed=5, depths=[0.3, 0.7])
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        for i, trial in enumerate(trials):
            llm.llm_engine.add_request(f"s{i}", trial.prompt, params)

        def within_budget(internal_id, request):
            assert manager.num_resident_blocks(internal_id) <= BUDGET // manager.block_size + 1

        texts, checked = run_checking_decodes(llm, within_budget)
        assert checked > 0 and len(texts) == TRIALS
        runtime = current_runtime()
        assert runtime.policy.name == policy
        # ~47 prompt pages down to 16 at the prompt's end, in every layer.
        assert runtime.stats.evicted >= TRIALS * 25 * runtime.num_layers
        hits = sum(found(t, texts[f"s{i}"]) for i, t in enumerate(trials))
        report(f"{policy} at budget {BUDGET}: {hits}/{TRIALS} passkeys at ~{PROMPT_TOKENS} tokens")
    finally:
        close_llm(llm)
