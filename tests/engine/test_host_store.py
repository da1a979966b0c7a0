"""arkvale's host page store when it is full: requests wait (or are preempted), none fails."""
import pytest

from tests.engine.conftest import block_manager, scheduler
from tests.engine.test_arkvale import BUDGET, _filler_prompt, _runtime

pytestmark = pytest.mark.engine


def test_full_host_store_makes_requests_wait_not_fail(llm_factory):
    from vllm import SamplingParams

    # 0.1 GiB holds 145 pages (720 KiB each on this model): one 4096-token request plus a bit.
    small = llm_factory("arkvale", BUDGET, kv_host_space=0.1, max_model_len=4096)
    manager, sched = block_manager(small), scheduler(small)
    assert manager.host_pages == 145
    # Allocated with the KV cache, before any request: host pages and digests of every layer.
    store = _runtime().store
    assert store.bound and store.used_pages == 0
    assert [p.shape[0] for p in store.pages] == [145] * store.num_layers
    assert [d.shape[0] for d in store.digests] == [145] * store.num_layers
    tokenizer = small.get_tokenizer()
    prompts = [_filler_prompt(tokenizer, 1500 + 100 * i, f"h{i}") for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        small.llm_engine.add_request(f"h{i}", prompt, params)
    outputs, most_running = {}, 0
    while small.llm_engine.has_unfinished_requests():
        for output in small.llm_engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        most_running = max(most_running, len(sched.running))
        assert manager.host_reserved_total <= manager.host_pages
    assert most_running < len(prompts)  # the store, not the KV pool, limited concurrency
    # Counted for /metrics: each request kept waiting once, however many steps it waited.
    assert 1 <= manager.host_store_refusals["waited"] <= len(prompts) - 1
    assert all(len(outputs[f"h{i}"]) == 24 for i in range(4))
    small.llm_engine.step()  # the step that tells the workers which requests finished
    assert manager.host_reserved_total == 0 and _runtime().store.used_pages == 0
