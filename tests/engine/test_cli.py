"""`--kv-*` flags, `--additional-config`, `--config` YAML, `LLM(kv_*=...)` and start-up errors.

Most tests parse with the parser `vllm serve` builds and resolve engine configs in this process
(no engine starts). The subprocess tests run the real `vllm serve` and a fresh `python`, and each
fails before any model weights load (about 6 s each, mostly importing vLLM).
"""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import serve_engine_args
from vllm_kvevict.config import EvictionConfigError

REPO = Path(__file__).resolve().parents[2]
STREAMINGLLM_YAML = REPO / "configs" / "streamingllm.yaml"
NONE_YAML = REPO / "configs" / "none.yaml"

pytestmark = pytest.mark.usefixtures("restore_environ")


# --- parsing -------------------------------------------------------------------------------


def test_flags_fill_additional_config(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path, "--kv-eviction-policy", "streamingllm",
                             "--kv-budget", "512", "--kv-sink-tokens", "32")
    assert args.additional_config == {
        "kv_eviction": {"policy": "streamingllm", "budget": 512, "sink_tokens": 32}}


def test_flag_group_offers_implemented_policies_only(serve_parser):
    from vllm_kvevict.engine.cli import GROUP_TITLE
    from vllm_kvevict.policies import POLICY_REGISTRY

    serve = serve_parser._subparsers._group_actions[0].choices["serve"]
    group = next(g for g in serve._action_groups if g.title == GROUP_TITLE)
    actions = {a.option_strings[0]: a for a in group._group_actions}
    assert sorted(actions) == ["--kv-budget", "--kv-digest", "--kv-eviction-policy",
                               "--kv-host-space", "--kv-observation-window",
                               "--kv-per-head-selection", "--kv-recent-ratio",
                               "--kv-sink-tokens", "--kv-sparse-attention", "--kv-top-k-tokens",
                               "--kv-window-tokens"]
    assert actions["--kv-eviction-policy"].choices == sorted(POLICY_REGISTRY)
    assert sorted(POLICY_REGISTRY) == ["arkvale", "h2o", "lfa", "lra", "none", "quest", "roco",
                                       "snapkv", "streamingllm", "tova"]
    assert all(actions[f].type is int for f in ("--kv-budget", "--kv-sink-tokens",
                                                "--kv-window-tokens", "--kv-top-k-tokens",
                                                "--kv-observation-window"))
    assert actions["--kv-host-space"].type is float and actions["--kv-recent-ratio"].type is float


def serve_help(parser, capsys, *flags) -> str:
    """What `vllm serve *flags` prints for a help request (vLLM keeps the keyword on the class)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["serve", *flags])
    finally:
        FlexibleArgumentParser._search_keyword = None
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("keyword", ["KVEviction", "kveviction"])
def test_help_section_by_one_word(serve_parser, capsys, keyword):
    """`vllm serve --help=KVEviction` shows the plugin's group, as `--help=CacheConfig` does."""
    from vllm_kvevict.engine.cli import GROUP_TITLE

    shown = serve_help(serve_parser, capsys, f"--help={keyword}")
    assert shown.startswith(f"{GROUP_TITLE}:\n")  # the group itself, not a flag-name match
    flags = sorted(set(re.findall(r"^\s+(--kv-[a-z-]+)", shown, re.MULTILINE)))
    assert flags == ["--kv-budget", "--kv-digest", "--kv-eviction-policy", "--kv-host-space",
                     "--kv-observation-window", "--kv-per-head-selection", "--kv-recent-ratio",
                     "--kv-sink-tokens",
                     "--kv-sparse-attention", "--kv-top-k-tokens", "--kv-window-tokens"]
    assert "--block-size" not in shown


def test_help_section_of_prefix_cache_eviction(serve_parser, capsys):
    from vllm_kvevict.engine.cli import PREFIX_GROUP_TITLE

    shown = serve_help(serve_parser, capsys, "--help=prefixcacheeviction")
    assert shown.startswith(f"{PREFIX_GROUP_TITLE}:\n")
    flags = sorted(set(re.findall(r"^\s+(--prefix-[a-z-]+)", shown, re.MULTILINE)))
    assert "--kv-budget" not in shown
    assert flags == ["--prefix-cache-alpha", "--prefix-cache-eviction-policy",
                     "--prefix-cache-tune-window"]


def test_help_lists_the_section(serve_parser, capsys):
    """Plain `vllm serve --help` lists the section by the name `--help=` takes."""
    shown = serve_help(serve_parser, capsys, "--help")
    assert re.search(r"^\s+KVEviction\s+vllm-kvevict: cap the KV cache", shown, re.MULTILINE)


def test_additional_config_route_alone(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path,
                             "--additional-config.kv_eviction.policy", "streamingllm",
                             "--additional-config.kv_eviction.budget", "2048")
    assert args.additional_config == {"kv_eviction": {"policy": "streamingllm", "budget": 2048}}


def test_flags_override_additional_config(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path, "--additional-config",
                             json.dumps({"other": 1, "kv_eviction": {"policy": "streamingllm",
                                                                     "budget": 2048}}),
                             "--kv-budget", "512")
    assert args.additional_config == {
        "other": 1, "kv_eviction": {"policy": "streamingllm", "budget": 512}}


def test_install_is_idempotent(serve_parser):
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    from vllm_kvevict.engine import cli

    hooks = [EngineArgs.add_cli_args, EngineArgs.from_cli_args, EngineArgs.__init__,
             AsyncEngineArgs.__init__, EngineArgs.create_engine_config]
    cli.install()
    cli.install()
    assert [EngineArgs.add_cli_args, EngineArgs.from_cli_args, EngineArgs.__init__,
            AsyncEngineArgs.__init__, EngineArgs.create_engine_config] == hooks
    original = EngineArgs.__dict__["create_engine_config"].__kvevict_original__
    assert not hasattr(original, "__kvevict_original__")


def test_no_flags_leave_config_untouched(serve_parser, model_path):
    assert serve_engine_args(serve_parser, model_path).additional_config == {}


def test_yaml_config_file(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path, "--config", STREAMINGLLM_YAML)
    assert args.additional_config == {"kv_eviction": {
        "policy": "streamingllm", "budget": 512, "sink_tokens": 64, "window_tokens": 64}}
    assert (args.block_size, args.max_model_len) == (32, 8192)


def test_command_line_overrides_yaml(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path, "--config", STREAMINGLLM_YAML,
                             "--kv-budget", "1024")
    assert args.additional_config["kv_eviction"]["budget"] == 1024


@pytest.mark.parametrize("flags, message", [
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "0"],
     "--kv-budget must be a positive integer, got 0"),
    (["--kv-window-tokens", "-5"], "--kv-window-tokens must be a positive integer, got -5"),
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "100"],
     "--kv-budget 100 is smaller than --kv-sink-tokens 64 + --kv-window-tokens 64"),
    (["--kv-eviction-policy", "h2o", "--kv-recent-ratio", "1.5"],
     "--kv-recent-ratio must be a number between 0 and 1 (exclusive), got 1.5"),
    (["--additional-config.kv_eviction.policy", "nope"], "unknown --kv-eviction-policy 'nope'"),
    (["--additional-config.kv_eviction.budgets", "512"], "unknown kv_eviction setting(s) budgets"),
])
def test_bad_settings_are_refused_while_parsing(serve_parser, model_path, flags, message):
    with pytest.raises(EvictionConfigError) as error:
        serve_engine_args(serve_parser, model_path, *flags)
    assert message in str(error.value)


# --- engine config -------------------------------------------------------------------------


@pytest.fixture
def kvevict_log(monkeypatch):
    """Records what the plugin logs.

    vLLM's loggers do not propagate to pytest's caplog, and vLLM (re)configures logging inside
    create_engine_config, which drops handlers from child loggers: record at ``Logger.handle``.
    """
    records = []
    monkeypatch.setattr(logging.getLogger("vllm.kvevict"), "handle", records.append)
    return records


def test_evicting_policy_resolves_block_size_32_without_prefix_caching(
        serve_parser, model_path, kvevict_log):
    args = serve_engine_args(serve_parser, model_path, "--kv-eviction-policy", "streamingllm",
                             "--kv-budget", "512")
    assert args.block_size is None
    config = args.create_engine_config()
    assert config.cache_config.block_size == 32  # the CPU platform's own default is 128
    assert config.cache_config.enable_prefix_caching is False
    assert config.additional_config == {"kv_eviction": {"policy": "streamingllm", "budget": 512}}
    messages = [r.getMessage() for r in kvevict_log if "prefix caching" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("vllm-kvevict: evicted blocks cannot")
    assert all(r.levelno == logging.INFO for r in kvevict_log)
    assert any("budget 512 tokens = 16 blocks of 32" in r.getMessage() for r in kvevict_log)


def test_explicit_block_size_and_prefix_caching_request(serve_parser, model_path, kvevict_log):
    args = serve_engine_args(serve_parser, model_path, "--kv-eviction-policy", "streamingllm",
                             "--block-size", "64", "--enable-prefix-caching")
    config = args.create_engine_config()
    assert config.cache_config.block_size == 64
    assert config.cache_config.enable_prefix_caching is False
    assert [r.levelno for r in kvevict_log if "prefix caching" in r.getMessage()] == [
        logging.WARNING]


def test_policy_none_changes_nothing(plugin, model_path):
    from vllm.engine.arg_utils import EngineArgs

    stock = EngineArgs(model=model_path, max_model_len=8192).create_engine_config()
    none = EngineArgs(model=model_path, max_model_len=8192,
                      kv_eviction_policy="none").create_engine_config()
    assert stock.cache_config.block_size == none.cache_config.block_size == 128
    assert stock.cache_config.enable_prefix_caching is none.cache_config.enable_prefix_caching
    assert none.additional_config == {}
    assert none.compute_hash() == stock.compute_hash()


def test_yaml_configs_resolve(serve_parser, model_path):
    streaming = serve_engine_args(serve_parser, model_path, "--config", STREAMINGLLM_YAML)
    none = serve_engine_args(serve_parser, model_path, "--config", NONE_YAML)
    assert streaming.create_engine_config().cache_config.block_size == 32
    assert none.create_engine_config().cache_config.block_size == 128
    arkvale = serve_engine_args(serve_parser, model_path, "--config",
                                REPO / "configs" / "arkvale.yaml")
    assert arkvale.additional_config["kv_eviction"] == {
        "policy": "arkvale", "budget": 512, "sink_tokens": 64, "window_tokens": 64,
        "top_k_tokens": 192, "host_space_gib": 4.0,
        "digest": "cuboid-mean"}
    assert arkvale.create_engine_config().cache_config.block_size == 32


@pytest.mark.parametrize("flags, message", [
    (["--kv-budget", "100", "--kv-sink-tokens", "33", "--kv-window-tokens", "33"],
     "--kv-budget holds 3 blocks of 32 tokens, fewer than 2 sink + 2 window blocks"),
    (["--block-size", "128", "--kv-budget", "200"],
     "--kv-budget holds 1 blocks of 128 tokens, fewer than 1 sink + 1 window blocks"),
])
def test_budget_is_checked_in_blocks(serve_parser, model_path, flags, message):
    args = serve_engine_args(serve_parser, model_path, "--kv-eviction-policy", "streamingllm",
                             *flags)
    with pytest.raises(EvictionConfigError, match=re.escape(message)):
        args.create_engine_config()


# --- unsupported models (real ModelConfigs from config-only model directories) -------------


def _config_only_model(root: Path, name: str, hf_config) -> str:
    """A model directory holding only config.json: enough for vLLM's ModelConfig."""
    path = root / name
    hf_config.save_pretrained(path)
    return str(path)


UNSUPPORTED = {
    "attention-free": lambda t: t.MambaConfig(num_hidden_layers=2, hidden_size=64,
                                              architectures=["MambaForCausalLM"]),
    "hybrid": lambda t: t.JambaConfig(num_hidden_layers=2, hidden_size=64,
                                      architectures=["JambaForCausalLM"]),
    "MLA": lambda t: t.DeepseekV2Config(num_hidden_layers=2, hidden_size=64,
                                        architectures=["DeepseekV2ForCausalLM"]),
    "encoder-decoder": lambda t: t.WhisperConfig(
        architectures=["WhisperForConditionalGeneration"]),
    "sliding-window": lambda t: t.Gemma2Config(num_hidden_layers=2, hidden_size=64,
                                               architectures=["Gemma2ForCausalLM"]),
}


@pytest.fixture(scope="module")
def unsupported_models(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("unsupported")
    return {word: _config_only_model(root, word, factory(transformers))
            for word, factory in UNSUPPORTED.items()}


@pytest.mark.parametrize("word", sorted(UNSUPPORTED))
def test_unsupported_models_are_refused(plugin, unsupported_models, word):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=unsupported_models[word], max_model_len=256,
                      kv_eviction_policy="streamingllm")
    with pytest.raises(EvictionConfigError, match=f"{word}.*KV eviction supports decoder-only"):
        args.create_engine_config()


def test_unsupported_model_is_fine_without_eviction(plugin, unsupported_models):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=unsupported_models["MLA"], max_model_len=256,
                        kv_eviction_policy="none").create_engine_config()
    assert config.model_config.use_mla


# --- offline API ---------------------------------------------------------------------------


def test_engine_args_keywords(plugin, model_path):
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    for cls in (EngineArgs, AsyncEngineArgs):
        args = cls(model=model_path, kv_eviction_policy="streamingllm", kv_window_tokens=96,
                   kv_budget=None, additional_config={"other": 1})
        assert args.additional_config == {
            "other": 1, "kv_eviction": {"policy": "streamingllm", "window_tokens": 96}}


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_budget=0), "--kv-budget must be a positive integer, got 0"),
    (dict(kv_budget=100), "--kv-budget 100 is smaller than"),
    (dict(kv_budget=100, kv_sink_tokens=33, kv_window_tokens=33), "--kv-budget holds 3 blocks"),
])
def test_llm_raises_eviction_config_error(plugin, model_path, kwargs, message):
    from vllm import LLM

    with pytest.raises(EvictionConfigError, match=re.escape(message)):
        LLM(model_path, kv_eviction_policy="streamingllm", **kwargs)


def _run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ), **kwargs)


def test_llm_additional_config_needs_no_register_call(model_path):
    """In a fresh process vLLM loads the plugin itself before reading additional_config."""
    script = ("from vllm import LLM\n"
              f"LLM({model_path!r}, additional_config={{'kv_eviction': {{'policy': "
              "'streamingllm', 'budget': 100, 'sink_tokens': 33, 'window_tokens': 33}})\n")
    result = _run([sys.executable, "-c", script])
    assert result.returncode != 0
    assert "EvictionConfigError: --kv-budget holds 3 blocks of 32 tokens" in result.stderr


def test_serve_command_folds_flags_into_args_and_reports_one_line(capsys):
    """Extra API-server processes get `args` only, and load the plugin after reading it."""
    from argparse import Namespace

    from vllm_kvevict.engine.cli import _serve_cmd

    args = Namespace(additional_config={"other": 1}, kv_eviction_policy="streamingllm",
                     kv_budget=512, kv_sink_tokens=None, kv_window_tokens=None)
    seen = []
    _serve_cmd(lambda a: seen.append(a.additional_config), args)
    assert seen == [{"other": 1, "kv_eviction": {"policy": "streamingllm", "budget": 512}}]

    def fails_in_create_engine_config(_):
        raise EvictionConfigError("model-dependent problem")

    with pytest.raises(SystemExit) as exit_info:
        _serve_cmd(fails_in_create_engine_config, args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "vllm-kvevict: error: model-dependent problem\n"


# --- `vllm serve`: one line, no traceback, non-zero exit --------------------------------------


@pytest.fixture(scope="module")
def bad_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "bad.yaml"
    path.write_text(STREAMINGLLM_YAML.read_text().replace("kv-budget: 512", "kv-budget: 100"))
    return path


@pytest.mark.parametrize("flags, message", [
    (["--kv-eviction-policy", "bogus"], "argument --kv-eviction-policy: invalid choice: 'bogus'"),
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "-5"],
     "vllm-kvevict: error: --kv-budget must be a positive integer, got -5"),
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "100"],
     "vllm-kvevict: error: --kv-budget 100 is smaller than --kv-sink-tokens 64 + "
     "--kv-window-tokens 64"),
    (["--kv-eviction-policy", "h2o", "--kv-recent-ratio", "1.5"],
     "vllm-kvevict: error: --kv-recent-ratio must be a number between 0 and 1 (exclusive), "
     "got 1.5"),
    (["--additional-config.kv_eviction.policy", "nope"],
     "vllm-kvevict: error: unknown --kv-eviction-policy 'nope'"),
    (["--config", "BAD_YAML"],
     "vllm-kvevict: error: --kv-budget 100 is smaller than --kv-sink-tokens 64"),
    # needs the resolved block size, so it is raised from create_engine_config
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "100", "--kv-sink-tokens", "33",
      "--kv-window-tokens", "33"],
     "vllm-kvevict: error: --kv-budget holds 3 blocks of 32 tokens, fewer than 2 sink + 2 window"),
    # needs the model's config, so it is raised from create_model_config
    (["MLA_MODEL", "--kv-eviction-policy", "streamingllm"],
     "uses MLA attention; KV eviction supports decoder-only models"),
])
def test_vllm_serve_refuses_bad_input_with_one_line(model_path, unsupported_models, bad_yaml,
                                                    flags, message):
    flags = [str(bad_yaml) if f == "BAD_YAML" else f for f in flags]
    model = model_path
    if flags[0] == "MLA_MODEL":
        model, flags = unsupported_models["MLA"], ["--max-model-len", "256", *flags[1:]]
    vllm = str(Path(sys.executable).with_name("vllm"))
    result = _run([vllm, "serve", model, "--port", "0", *flags])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if message in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_arkvale_flags_reach_additional_config(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path, "--kv-eviction-policy", "arkvale",
                             "--kv-host-space", "0.5", "--kv-sparse-attention", "--kv-digest",
                             "cuboid-max", "--kv-top-k-tokens", "128")
    assert args.additional_config == {"kv_eviction": {
        "policy": "arkvale", "host_space_gib": 0.5, "sparse_attention": True,
        "digest": "cuboid-max", "top_k_tokens": 128}}
    args = serve_engine_args(serve_parser, model_path, "--kv-eviction-policy", "arkvale",
                             "--no-kv-per-head-selection")
    assert args.additional_config == {"kv_eviction": {
        "policy": "arkvale", "per_head_selection": False}}


def test_attention_statistics_flags_reach_additional_config(serve_parser, model_path):
    args = serve_engine_args(serve_parser, model_path, "--kv-eviction-policy", "roco",
                             "--kv-observation-window", "16", "--kv-recent-ratio", "0.25")
    assert args.additional_config == {"kv_eviction": {
        "policy": "roco", "observation_window": 16, "recent_ratio": 0.25}}
