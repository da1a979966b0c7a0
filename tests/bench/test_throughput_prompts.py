"""Throughput prompts share no KV block, so prefix caching cannot favour ``none``."""
from vllm_kvevict.bench.common import BLOCK_SIZE
from vllm_kvevict.bench.throughput import distinct_prompt
from vllm_kvevict.eval.passkey import make_trial


def test_prompts_differ_in_their_first_block(model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Same key and depth: without the distinct first line the prompts would be identical.
    prompt = make_trial(tokenizer, 300, 0.5, "12345").prompt
    first_blocks = {tuple(tokenizer.encode(distinct_prompt(i, prompt))[:BLOCK_SIZE])
                    for i in range(16)}
    assert len(first_blocks) == 16
