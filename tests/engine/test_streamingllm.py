"""StreamingLLM on the real engine: the budget holds, eviction is real, capacity grows."""
import pytest

from tests.engine.conftest import block_manager, scheduler, start_llm_in_subprocess

pytestmark = pytest.mark.engine


def _filler_prompt(tokenizer, num_tokens: int, tag: str) -> str:
    from vllm_kvevict.eval.passkey import FILLER

    text = f"Document {tag}.\n"
    while len(tokenizer.encode(text)) < num_tokens:
        text += FILLER
    return text


def test_resident_blocks_stay_within_budget(llm_factory):
    from vllm import SamplingParams

    budget = 256
    llm = llm_factory("streamingllm", budget)
    manager, sched = block_manager(llm), scheduler(llm)
    budget_pages = budget // manager.block_size
    pool = manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    tokenizer = llm.get_tokenizer()
    lengths = {"a": 1500, "b": 1000, "c": 600}
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    for req_id, num_tokens in lengths.items():
        llm.llm_engine.add_request(req_id, _filler_prompt(tokenizer, num_tokens, req_id), params)

    peak_after_prefill = {}
    longest_table = {}
    generated = {}
    while llm.llm_engine.has_unfinished_requests():
        for output in llm.llm_engine.step():
            if output.finished:
                generated[output.request_id] = len(output.outputs[0].token_ids)
        for internal_id, request in sched.requests.items():
            req_id = internal_id.split("-")[0]  # vLLM suffixes the ids it is given
            blocks = manager.req_to_blocks.get(internal_id, [])
            if request.num_computed_tokens > request.num_prompt_tokens:
                resident = manager.num_resident_blocks(internal_id)
                peak_after_prefill[req_id] = max(peak_after_prefill.get(req_id, 0), resident)
                longest_table[req_id] = max(longest_table.get(req_id, 0), len(blocks))

    assert generated == {req_id: 500 for req_id in lengths}
    assert set(peak_after_prefill) == set(lengths)
    for req_id, peak in peak_after_prefill.items():
        # The budget plus the block being filled, while the context grew far past it.
        assert peak <= budget_pages + 1, (req_id, peak)
        assert longest_table[req_id] * manager.block_size >= lengths[req_id] + 400
    # Every block went back to the pool.
    assert pool.get_num_free_blocks() == free_at_start


def _passkey_results(llm, trials):
    from vllm import SamplingParams

    from vllm_kvevict.eval.passkey import found

    outputs = llm.generate([t.prompt for t in trials], SamplingParams(temperature=0, max_tokens=8))
    return [found(t, o.outputs[0].text) for t, o in zip(trials, outputs)]


@pytest.fixture(scope="module")
def passkey_trials(model_path):
    from transformers import AutoTokenizer

    from vllm_kvevict.eval.passkey import make_trials

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    middle = make_trials(tokenizer, 2000, 3, depths=[0.3, 0.5, 0.7])
    # ~100 tokens before the question: inside a 512-token budget's recent window.
    recent = make_trials(tokenizer, 2000, 1, seed=1, depths=[0.95])
    return middle, recent


@pytest.fixture(scope="module")
def none_llm(llm_factory):
    return llm_factory("none", block_size=32)


@pytest.fixture(scope="module")
def streaming_512(llm_factory):
    return llm_factory("streamingllm", 512)


def test_passkey_evicted_by_streamingllm_but_recent_window_kept(none_llm, streaming_512,
                                                                passkey_trials):
    middle, recent = passkey_trials
    assert _passkey_results(none_llm, middle + recent) == [True] * 4
    assert _passkey_results(streaming_512, middle) == [False] * 3
    assert _passkey_results(streaming_512, recent) == [True]


def test_startup_capacity_reflects_budget(none_llm, streaming_512):
    none, streaming = none_llm, streaming_512
    none_concurrency = none.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency
    streaming_concurrency = streaming.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency
    # 8192-token requests at full cache vs 512 + one page being filled: 8192 / 544 ~ 15x.
    assert streaming_concurrency >= 4 * none_concurrency


def test_prompt_that_cannot_fit_the_pool_is_refused_at_startup(model_path):
    """Prompts are prefilled in full: a max_model_len beyond the pool must not start (and hang)."""
    result = start_llm_in_subprocess(
        model_path, "kv_eviction_policy='streamingllm', kv_budget=256, max_model_len=65536, "
        "hf_overrides={'max_position_embeddings': 65536}")
    assert result.returncode != 0
    assert "prompts are prefilled in full and --max-model-len is 65536" in result.stderr
