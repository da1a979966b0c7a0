"""Greedy token ids from a vLLM engine, as JSON on stdout. Run as a script by the tests.

    VLLM_PLUGINS=<none> python stock_greedy.py MODEL PROMPTS_JSON MAX_TOKENS BLOCK_SIZE

With ``VLLM_PLUGINS`` naming no installed plugin, this is stock vLLM without vllm-kvevict.
"""
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, prompts_file, max_tokens, block_size = sys.argv[1:5]
    prompts = json.loads(open(prompts_file).read())
    llm = LLM(model, max_model_len=8192, enforce_eager=True, seed=0, block_size=int(block_size))
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=int(max_tokens)))
    print("GREEDY_TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    main()
