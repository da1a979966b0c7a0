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


def test_decode_phase_separates_first_tokens_and_overlapping_intervals():
    from vllm_kvevict.bench.throughput import decode_phase

    # Request a: first token at 1 s, 5 tokens by 3 s; b: first at 2 s, 3 tokens by 6 s.
    replies = [(5, [1.0, 1.5, 2.0, 2.5, 3.0]), (3, [2.0, 4.0, 6.0]), (1, [2.5])]
    phase = decode_phase(replies)
    assert phase["mean_itl_ms"] == 1000 * (0.5 + 2.0) / 2
    assert phase["decode_tok_s"] == (4 + 2) / 5.0  # decoding from 1 s to 6 s
