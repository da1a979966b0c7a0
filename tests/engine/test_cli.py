"""The `--kv-*` flags, `--additional-config`, `--config` YAML, and one-line start-up errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvevict.config import EvictionConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_kvevict

    vllm_kvevict.register()
    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def _engine_args(parser, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_kvevict.model import prepare_bundled_model

    argv = [str(prepare_bundled_model()) if a == "MODEL" else a for a in argv]
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_flags_fill_additional_config(parser):
    args = _engine_args(parser, ["--model", "MODEL", "--kv-eviction-policy", "streamingllm",
                                 "--kv-budget", "512", "--kv-sink-tokens", "32"])
    assert args.additional_config == {
        "kv_eviction": {"policy": "streamingllm", "budget": 512, "sink_tokens": 32}}


def test_additional_config_route_and_flag_precedence(parser):
    args = _engine_args(parser, ["--model", "MODEL", "--additional-config.kv_eviction.policy",
                                 "streamingllm", "--additional-config.kv_eviction.budget", "2048",
                                 "--kv-budget", "512"])
    assert args.additional_config["kv_eviction"] == {"policy": "streamingllm", "budget": 512}


def test_no_flags_leave_config_untouched(parser):
    assert not _engine_args(parser, ["--model", "MODEL"]).additional_config


def test_yaml_config_file(parser):
    args = _engine_args(parser, ["--model", "MODEL", "--config", str(REPO / "configs/streamingllm.yaml")])
    assert args.additional_config["kv_eviction"] == {
        "policy": "streamingllm", "budget": 512, "sink_tokens": 64, "window_tokens": 64}
    assert args.block_size == 32


def test_engine_args_keywords(model_path):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_kvevict

    vllm_kvevict.register()
    args = EngineArgs(model=model_path, kv_eviction_policy="streamingllm", kv_window_tokens=96,
                      additional_config={"other": 1})
    assert args.additional_config == {
        "other": 1, "kv_eviction": {"policy": "streamingllm", "window_tokens": 96}}


def test_unsupported_models_are_refused():
    from types import SimpleNamespace

    from vllm_kvevict.engine.cli import check_model_supported

    plain = dict(model="m", use_mla=False, is_attention_free=False, is_hybrid=False,
                 is_encoder_decoder=False, hf_text_config=SimpleNamespace())
    check_model_supported(SimpleNamespace(**plain))
    for flag, word in [("use_mla", "MLA"), ("is_hybrid", "hybrid"), ("is_attention_free",
                       "attention-free"), ("is_encoder_decoder", "encoder-decoder")]:
        with pytest.raises(EvictionConfigError, match=word):
            check_model_supported(SimpleNamespace(**{**plain, flag: True}))
    with pytest.raises(EvictionConfigError, match="sliding-window"):
        check_model_supported(SimpleNamespace(
            **{**plain, "hf_text_config": SimpleNamespace(sliding_window=4096)}))


@pytest.mark.parametrize("flags, message", [
    (["--kv-eviction-policy", "bogus"], "invalid choice: 'bogus'"),
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "0"],
     "vllm-kvevict: error: --kv-budget must be a positive integer, got 0"),
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "100"],
     "vllm-kvevict: error: --kv-budget 100 is smaller than --kv-sink-tokens 64 + "
     "--kv-window-tokens 64"),
    (["--kv-eviction-policy", "streamingllm", "--kv-budget", "100", "--kv-sink-tokens", "33",
      "--kv-window-tokens", "33"],
     "vllm-kvevict: error: --kv-budget holds 3 blocks of 32 tokens, fewer than 2 sink + 2 window"),
    (["--additional-config.kv_eviction.policy", "nope"],
     "vllm-kvevict: error: unknown --kv-eviction-policy 'nope'"),
])
def test_vllm_serve_refuses_bad_input_with_one_line(model_path, flags, message):
    vllm = str(Path(sys.executable).with_name("vllm"))
    result = subprocess.run([vllm, "serve", model_path, "--port", "0", *flags],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
