"""Engine fixtures: real vLLM engines with the plugin, run in the test process.

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process, so tests can read the
scheduler's block manager between steps.
"""
import gc
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402


def make_llm(model_path: str, policy: str, budget: int | None = None, **kwargs):
    from vllm import LLM

    import vllm_kvevict

    vllm_kvevict.register()
    eviction = {"kv_eviction_policy": policy}
    if budget is not None:
        eviction["kv_budget"] = budget
    kwargs.setdefault("max_model_len", 8192)
    return LLM(model_path, enforce_eager=True, seed=0, **eviction, **kwargs)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def block_manager(llm):
    """The scheduler's single-type manager of the (only) KV-cache group."""
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def run_checking_decodes(llm, check) -> tuple[dict[str, str], int]:
    """Step ``llm`` until its requests finish, calling ``check(internal_id, request)`` after each
    step for every request past its prompt; returns the finished texts by request id and the
    number of checks made."""
    sched = scheduler(llm)
    texts, checked = {}, 0
    while llm.llm_engine.has_unfinished_requests():
        for output in llm.llm_engine.step():
            if output.finished:
                texts[output.request_id] = output.outputs[0].text
        for internal_id, request in sched.requests.items():
            if request.num_computed_tokens > request.num_prompt_tokens:
                check(internal_id, request)
                checked += 1
    return texts, checked


@pytest.fixture
def restore_environ():
    """Resolving a config on CPU edits os.environ (LD_PRELOAD, thread counts...): undo that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def plugin():
    """The plugin installed in this process (as a user of `vllm.LLM(kv_*=...)` must do)."""
    import vllm_kvevict

    vllm_kvevict.register()


@pytest.fixture(scope="module")
def llm_factory(model_path):
    """Build engines on demand; each is shut down at the end of the module."""
    built = []

    def build(policy: str, budget: int | None = None, **kwargs):
        llm = make_llm(model_path, policy, budget, **kwargs)
        built.append(llm)
        return llm

    yield build
    for llm in built:
        close_llm(llm)


def start_llm_in_subprocess(model_path: str, llm_kwargs: str):
    """Build ``LLM(model_path, <llm_kwargs>)`` with the plugin in a fresh process (start-up
    refusals end that process); returns the finished ``subprocess.CompletedProcess``."""
    import subprocess
    import sys

    script = ("import vllm_kvevict\n"
              "from vllm import LLM\n"
              "if __name__ == '__main__':\n"
              "    vllm_kvevict.register()\n"
              f"    LLM({model_path!r}, enforce_eager=True, {llm_kwargs})\n")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="session")
def tiny_llama(model_path, tmp_path_factory):
    """A 2-layer Llama with 4 query and 2 KV heads (splits over TP=2), random weights, the bundled
    tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def serve_parser(plugin):
    """The top-level `vllm` parser with the `serve` subcommand, as `vllm` builds it."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser


def serve_engine_args(parser, model_path, *flags):
    """`vllm serve MODEL *flags` parsed, then turned into engine args as `vllm serve` does."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parser.parse_args(["serve", model_path, *map(str, flags)])
    args.model = args.model_tag  # what ServeSubcommand.cmd does first
    return AsyncEngineArgs.from_cli_args(args)
