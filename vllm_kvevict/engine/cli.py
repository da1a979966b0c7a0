"""`--kv-*` flags, `LLM(kv_*=...)` keywords and start-up checks, hooked into vLLM's EngineArgs.

Every route ends in ``VllmConfig.additional_config["kv_eviction"]`` (a plain dict that pickles
into the engine core and the workers):

* ``vllm serve --kv-eviction-policy ...`` and ``--config file.yaml`` keys: an argument group added
  to ``EngineArgs.add_cli_args``; ``EngineArgs.from_cli_args`` folds the values in.
* ``--additional-config.kv_eviction.<name>``: vLLM's own route; explicit flags override it.
* ``vllm.LLM(model, kv_eviction_policy=...)``: ``EngineArgs.__init__`` takes the keywords.

``EngineArgs.create_engine_config`` validates the settings and, for an evicting policy, defaults
the block size to 32, turns prefix caching off and refuses unsupported models. Mistakes raise
:class:`EvictionConfigError`; under ``vllm serve`` they are printed as one line (exit code 2).
"""
from __future__ import annotations

import argparse
import functools
import sys

from vllm_kvevict.config import (ADDITIONAL_CONFIG_KEY, DEFAULT_EVICTING_BLOCK_SIZE,
                                 EvictionConfig, EvictionConfigError)

# flag/keyword suffix -> key in additional_config["kv_eviction"]
SETTINGS = {"eviction_policy": "policy", "budget": "budget", "sink_tokens": "sink_tokens",
            "window_tokens": "window_tokens"}
_INSTALLED_MARK = "_kvevict_wrapped"


def install() -> None:
    """Wrap EngineArgs and the serve command (idempotent; called in every vLLM process)."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand

    _patch(EngineArgs, "add_cli_args", _add_cli_args)
    _patch(EngineArgs, "from_cli_args", _from_cli_args)
    _patch(EngineArgs, "create_engine_config", _create_engine_config)
    _patch(EngineArgs, "__init__", _init)
    _patch(AsyncEngineArgs, "__init__", _init)  # a dataclass subclass has its own __init__
    _patch(ServeSubcommand, "cmd", _serve_cmd)


def _patch(cls, name: str, wrapper) -> None:
    """Replace ``cls.name`` by ``wrapper(original, *args, **kwargs)``, keeping its method kind."""
    raw = vars(cls)[name]
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    original = raw.__func__ if kind else raw
    if getattr(original, _INSTALLED_MARK, False):
        return

    @functools.wraps(original)
    def patched(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    setattr(patched, _INSTALLED_MARK, True)
    setattr(cls, name, kind(patched) if kind else patched)


def _add_cli_args(original, parser, *args, **kwargs):
    from vllm_kvevict.policies import POLICY_REGISTRY

    parser = original(parser, *args, **kwargs)
    if any("--kv-eviction-policy" in action.option_strings for action in parser._actions):
        return parser
    group = parser.add_argument_group(
        "KV eviction (vllm-kvevict)",
        "Cap each request's resident KV cache (per layer) once its prompt is processed.")
    group.add_argument("--kv-eviction-policy", choices=sorted(POLICY_REGISTRY), default=None,
                       help="Eviction policy; 'none' (default) is stock vLLM.")
    group.add_argument("--kv-budget", type=int, default=None,
                       help="Resident KV tokens per request (rounded down to blocks). Default 1024.")
    group.add_argument("--kv-sink-tokens", type=int, default=None,
                       help="First tokens never evicted (rounded up to blocks). Default 64.")
    group.add_argument("--kv-window-tokens", type=int, default=None,
                       help="Most recent tokens never evicted (rounded up to blocks). Default 64.")
    return parser


def _merge_settings(additional_config, settings: dict) -> dict:
    """``additional_config`` with the non-None ``settings`` overriding its kv_eviction keys."""
    merged = dict(additional_config or {})
    given = {SETTINGS[name]: value for name, value in settings.items() if value is not None}
    if given:
        merged[ADDITIONAL_CONFIG_KEY] = {**dict(merged.get(ADDITIONAL_CONFIG_KEY) or {}), **given}
    return merged


def _from_cli_args(original, cls, args: argparse.Namespace):
    engine_args = original(cls, args)
    settings = {name: getattr(args, f"kv_{name}", None) for name in SETTINGS}
    engine_args.additional_config = _merge_settings(engine_args.additional_config, settings)
    return engine_args


def _init(original, self, *args, **kwargs):
    settings = {name: kwargs.pop(f"kv_{name}", None) for name in SETTINGS}
    if any(value is not None for value in settings.values()):
        kwargs["additional_config"] = _merge_settings(kwargs.get("additional_config"), settings)
    original(self, *args, **kwargs)


def _create_engine_config(original, self, *args, **kwargs):
    config = EvictionConfig.from_additional_config(self.additional_config)
    if not config.evicts:
        return original(self, *args, **kwargs)
    from vllm.logger import init_logger

    logger = init_logger("vllm.kvevict")
    if self.block_size is None:
        self.block_size = DEFAULT_EVICTING_BLOCK_SIZE
    if self.enable_prefix_caching is not False:
        logger.info("vllm-kvevict: prefix caching is off under --kv-eviction-policy %s "
                    "(evicted blocks cannot be shared)", config.policy)
        self.enable_prefix_caching = False
    vllm_config = original(self, *args, **kwargs)
    check_model_supported(vllm_config.model_config)
    block_size = vllm_config.cache_config.block_size
    layout = config.layout(block_size)
    logger.info("vllm-kvevict: policy %s, budget %d tokens = %d blocks of %d (%d sink, %d window)",
                config.policy, config.budget, layout.budget_pages, block_size,
                layout.sink_pages, layout.window_pages)
    return vllm_config


def check_model_supported(model_config) -> None:
    """Refuse models whose attention is not plain decoder full attention."""
    name = model_config.model
    if getattr(model_config, "use_mla", False):
        raise EvictionConfigError(f"{name} uses MLA attention, which KV eviction does not support")
    if getattr(model_config, "is_attention_free", False):
        raise EvictionConfigError(f"{name} is attention-free: there is no KV cache to evict")
    if getattr(model_config, "is_hybrid", False):
        raise EvictionConfigError(f"{name} is a hybrid (attention + SSM) model, which KV eviction "
                                  f"does not support")
    if getattr(model_config, "is_encoder_decoder", False):
        raise EvictionConfigError(f"{name} is an encoder-decoder model, which KV eviction does "
                                  f"not support")
    hf_text_config = getattr(model_config, "hf_text_config", None)
    if getattr(hf_text_config, "sliding_window", None) and getattr(
            hf_text_config, "use_sliding_window", True):
        raise EvictionConfigError(f"{name} uses sliding-window attention, which KV eviction does "
                                  f"not support")


def _serve_cmd(original, args, *rest, **kwargs):
    """`vllm serve`: report eviction mistakes as one line instead of a traceback."""
    try:
        if getattr(args, "kv_eviction_policy", None) is not None or getattr(
                args, "additional_config", None):
            # Validate flags before anything heavy starts.
            _settings = {name: getattr(args, f"kv_{name}", None) for name in SETTINGS}
            EvictionConfig.from_additional_config(
                _merge_settings(getattr(args, "additional_config", None), _settings))
        return original(args, *rest, **kwargs)
    except EvictionConfigError as error:
        print(f"vllm-kvevict: error: {error}", file=sys.stderr)
        sys.exit(2)
