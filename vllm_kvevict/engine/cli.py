"""`--kv-*` flags, `LLM(kv_*=...)` keywords and start-up checks, hooked into vLLM 0.32.

Every route ends in ``VllmConfig.additional_config["kv_eviction"]``, a plain dict holding only the
keys the user set (``policy``, ``budget``, ``sink_tokens``, ``window_tokens``); it pickles into
the engine core and the workers, which re-read it with ``EvictionConfig.from_vllm_config``.
The ``--prefix-cache-*`` flags and ``prefix_cache_*`` keywords end in
``additional_config["prefix_cache"]`` the same way (``PrefixCacheConfig``); under ``lru`` (the
default) that entry is dropped and nothing changes, under ``marconi`` the resolved config names
the plugin's scheduler class, which builds vLLM's scheduler over the Marconi block pool
(``engine/prefix_cache.py``). ``marconi`` with an evicting ``--kv-eviction-policy`` is refused:
those switch prefix caching off.

Hook points (all installed by :func:`install`, idempotent):

* ``EngineArgs.add_cli_args``: adds the ``KVEviction`` argument group, so the flags exist for
  ``vllm serve`` (``vllm serve --help=KVEviction`` shows them, as ``--help=CacheConfig`` shows
  vLLM's own sections) and as ``vllm serve --config file.yaml`` keys (vLLM turns YAML keys into
  flags before parsing).
* ``EngineArgs.from_cli_args``: folds the flags into ``additional_config``; they override the same
  keys given as ``--additional-config.kv_eviction.<key>`` (which works on its own, unpatched).
* ``EngineArgs.__init__`` / ``AsyncEngineArgs.__init__``: accept ``kv_*`` keywords, which is how
  ``vllm.LLM(model, kv_eviction_policy=...)`` reaches us (``LLM`` passes ``**kwargs`` through).
* ``EngineArgs.create_model_config``: refuses unsupported models as soon as the HF config is read.
* ``EngineArgs.create_engine_config``: under an evicting policy, :func:`adapt_engine_args`
  (block size, prefix caching, async scheduling, the V1 runner; on CUDA the plugin's attention
  backend and piecewise CUDA graphs), and the budget checked against the final block size.
  Policy ``none``: stock vLLM's config, bit for bit (the kv_eviction entry is dropped, so even
  the config hash matches).
* ``ServeSubcommand.cmd`` (``vllm serve`` only): prints :class:`EvictionConfigError` as one line.

Invariant: settings are validated (``EvictionConfig``) whenever they enter ``EngineArgs`` and
again in ``create_engine_config``; invalid settings never reach an engine.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from vllm_kvevict.config import (ADDITIONAL_CONFIG_KEY, DEFAULT_BUDGET_TOKENS,
                                 DEFAULT_EVICTING_BLOCK_SIZE, DEFAULT_HOST_SPACE_GIB,
                                 DEFAULT_OBSERVATION_WINDOW, DEFAULT_SINK_TOKENS,
                                 DEFAULT_WINDOW_TOKENS, DIGEST_KINDS,
                                 EvictionConfig, EvictionConfigError)
from vllm_kvevict.engine.patching import wrap_method
from vllm_kvevict.prefix_cache.config import (PREFIX_CACHE_KEY, PREFIX_CACHE_POLICIES,
                                              PrefixCacheConfig)
from vllm_kvevict.prefix_cache.tuning import DEFAULT_TUNE_WINDOW

# argparse dest / LLM keyword -> key in additional_config["kv_eviction"]
SETTINGS = {
    "kv_eviction_policy": "policy",
    "kv_budget": "budget",
    "kv_sink_tokens": "sink_tokens",
    "kv_window_tokens": "window_tokens",
    "kv_top_k_tokens": "top_k_tokens",
    "kv_host_space": "host_space_gib",
    "kv_sparse_attention": "sparse_attention",
    "kv_digest": "digest",
    "kv_observation_window": "observation_window",
    "kv_recent_ratio": "recent_ratio",
    "kv_per_head_selection": "per_head_selection",
}
# argparse dest / LLM keyword -> key in additional_config["prefix_cache"]
PREFIX_SETTINGS = {
    "prefix_cache_eviction_policy": "eviction_policy",
    "prefix_cache_alpha": "alpha",
    "prefix_cache_tune_window": "tune_window",
}
# One word each: vLLM's `--help=<section>` matches a group by its whole title, case-insensitively.
GROUP_TITLE = "KVEviction"
PREFIX_GROUP_TITLE = "PrefixCacheEviction"
ERROR_PREFIX = "vllm-kvevict: error: "
SERVE_MODULE = "vllm.entrypoints.cli.serve"


def install() -> None:
    """Install the hooks in this process. Safe to call any number of times, in any process.

    vLLM runs general plugins in every process it starts; only the process that parses the CLI or
    builds ``EngineArgs`` uses these hooks, elsewhere they are inert.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    wrap_method(EngineArgs, "add_cli_args", _add_cli_args)
    wrap_method(EngineArgs, "from_cli_args", _from_cli_args)
    # A dataclass subclass gets its own generated __init__, so both need the wrapper.
    wrap_method(EngineArgs, "__init__", _init_with_keywords)
    wrap_method(AsyncEngineArgs, "__init__", _init_with_keywords)
    wrap_method(EngineArgs, "create_model_config", _create_model_config)
    wrap_method(EngineArgs, "create_engine_config", _create_engine_config)
    # `vllm serve` imports its subcommand module before building the parser, which is when vLLM
    # loads plugins; other processes (engine core, workers, offline LLM) never import it, and
    # importing it there would only cost time (uvloop, the API server modules).
    serve = sys.modules.get(SERVE_MODULE)
    if serve is not None:
        wrap_method(serve.ServeSubcommand, "cmd", _serve_cmd)


# --- settings ------------------------------------------------------------------------------


def given_settings(values: Mapping[str, Any],
                   table: Mapping[str, str] = SETTINGS) -> dict[str, Any]:
    """The entries of ``values`` named in ``table`` (``kv_*`` by default) that were set, keyed
    as in ``additional_config``."""
    return {key: values[name] for name, key in table.items() if values.get(name) is not None}


def merge_settings(additional_config: Mapping[str, Any] | None,
                   given: Mapping[str, Any],
                   entry: str = ADDITIONAL_CONFIG_KEY) -> dict[str, Any]:
    """A copy of ``additional_config`` whose ``entry`` (kv_eviction by default) is updated
    with ``given``.

    ``given`` wins over keys already there (flags beat ``--additional-config.<entry>.*``).
    """
    merged = dict(additional_config or {})
    if given:
        current = merged.get(entry) or {}
        if not isinstance(current, Mapping):
            raise EvictionConfigError(
                f"--additional-config.{entry} must be a mapping, got {current!r}")
        merged[entry] = {**current, **given}
    return merged


def merge_all_settings(additional_config: Mapping[str, Any] | None,
                       values: Mapping[str, Any]) -> dict[str, Any]:
    """``additional_config`` with both the ``kv_*`` and the ``prefix_cache_*`` values set."""
    merged = merge_settings(additional_config, given_settings(values))
    return merge_settings(merged, given_settings(values, PREFIX_SETTINGS), PREFIX_CACHE_KEY)


def check_settings(additional_config: Mapping[str, Any] | None) -> None:
    """Validate both entries and the combination (raises :class:`EvictionConfigError`)."""
    config = eviction_config(additional_config)
    prefix = PrefixCacheConfig.from_additional_config(additional_config)
    if config.evicts and not prefix.is_stock:
        raise EvictionConfigError(
            f"--prefix-cache-eviction-policy {prefix.eviction_policy} needs vLLM's prefix cache, "
            f"which --kv-eviction-policy {config.policy} switches off (evicted blocks cannot be "
            f"shared between requests); use one of the two")


def eviction_config(additional_config: Mapping[str, Any] | None) -> EvictionConfig:
    """The validated settings in ``additional_config`` (raises :class:`EvictionConfigError`)."""
    raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if raw is not None and not isinstance(raw, Mapping):
        raise EvictionConfigError(
            f"--additional-config.{ADDITIONAL_CONFIG_KEY} must be a mapping, got {raw!r}")
    return EvictionConfig.from_additional_config(additional_config)


# --- CLI -----------------------------------------------------------------------------------


def _add_cli_args(original, parser, *args, **kwargs):
    from vllm_kvevict.policies import POLICY_REGISTRY

    parser = original(parser, *args, **kwargs)
    if "--kv-eviction-policy" in parser._option_string_actions:
        return parser  # EngineArgs.add_cli_args called twice on one parser
    group = parser.add_argument_group(
        GROUP_TITLE, "vllm-kvevict: cap the KV cache each request keeps (per layer) once its "
        "prompt is processed. Also accepted as --additional-config.kv_eviction.<setting> "
        "(policy, budget, sink_tokens, window_tokens, top_k_tokens, host_space_gib, "
        "sparse_attention, digest, observation_window, recent_ratio, per_head_selection); these "
        "flags win over it.")
    # The defaults stay None ("not set": vLLM's help prints them as "(default: None)"), so only
    # what the user set reaches additional_config; the effective defaults live in EvictionConfig.
    group.add_argument("--kv-eviction-policy", choices=sorted(POLICY_REGISTRY), default=None,
                       help="Eviction policy; unset means 'none' (stock vLLM).")
    group.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS",
                       help="KV tokens a request keeps once its prompt is processed (quest: "
                            "tokens attended per step), rounded down to whole blocks; "
                            f"{DEFAULT_BUDGET_TOKENS} when unset.")
    group.add_argument("--kv-sink-tokens", type=int, default=None, metavar="TOKENS",
                       help="First tokens never evicted, rounded up to whole blocks; "
                            f"{DEFAULT_SINK_TOKENS} when unset.")
    group.add_argument("--kv-window-tokens", type=int, default=None, metavar="TOKENS",
                       help="Most recent tokens never evicted, rounded up to whole blocks; "
                            f"{DEFAULT_WINDOW_TOKENS} when unset.")
    group.add_argument("--kv-top-k-tokens", type=int, default=None, metavar="TOKENS",
                       help="arkvale, quest: tokens picked per step by digest score besides "
                            "sinks and window, rounded down to blocks; when unset min(1280, "
                            "3/8 of the budget) (arkvale; budget/2 with --kv-sparse-attention) "
                            "or the rest of the budget (quest). arkvale "
                            "fills the rest of the budget with anchors: per layer, the prompt "
                            "pages its last --kv-observation-window queries attend to most.")
    group.add_argument("--kv-host-space", type=float, default=None, metavar="GIB",
                       help="arkvale: host memory per worker for page backups, in GiB; "
                            f"{DEFAULT_HOST_SPACE_GIB:g} when unset. Requests wait (or are "
                            "preempted) while it is full. On CUDA it is pinned memory, "
                            "committed when the engine starts.")
    group.add_argument("--kv-sparse-attention", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="arkvale: attend only over sinks + top-k + window pages instead of "
                            "all resident pages.")
    group.add_argument("--kv-per-head-selection", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="arkvale: each KV head selects (and recalls) its own pages, each "
                            "head's slice of a block holding the page that head chose; on "
                            "unless --kv-sparse-attention.")
    group.add_argument("--kv-digest", choices=DIGEST_KINDS, default=None,
                       help="arkvale: page digest, cuboid-mean (ArkVale, default) or cuboid-max "
                            "(min/max keys, as Quest).")
    group.add_argument("--kv-observation-window", type=int, default=None, metavar="TOKENS",
                       help="h2o, tova, roco, snapkv, lra, lfa: the last prompt queries whose "
                            "attention scores the prompt's pages when it ends (SnapKV's "
                            "window); arkvale: the queries that choose its anchors; "
                            f"{DEFAULT_OBSERVATION_WINDOW} when unset.")
    group.add_argument("--kv-recent-ratio", type=float, default=None, metavar="RATIO",
                       help="Share of --kv-budget held as the recent window (0..1); the window "
                            "is the larger of this and --kv-window-tokens.")
    prefix = parser.add_argument_group(
        PREFIX_GROUP_TITLE, "vllm-kvevict: which cached blocks of finished requests vLLM's prefix "
        "cache gives up when it needs a free block (not to be confused with --kv-eviction-policy, "
        "which drops a running request's tokens). Also accepted as "
        "--additional-config.prefix_cache.<setting> (eviction_policy, alpha, tune_window); "
        "these flags win over it.")
    prefix.add_argument("--prefix-cache-eviction-policy", choices=PREFIX_CACHE_POLICIES,
                        default=None,
                        help="lru: vLLM's own least-recently-used order (default, stock vLLM); "
                             "marconi: lowest recency + alpha * FLOPs-saved-per-byte among "
                             "cached blocks no other cached block depends on (Marconi, "
                             "MLSys'25). Needs prefix caching, so --kv-eviction-policy none.")
    prefix.add_argument("--prefix-cache-alpha", type=float, default=None, metavar="ALPHA",
                        help="marconi: fixed weight of FLOPs per byte against recency; unset: "
                             "tuned online by replaying recent requests over 0..2.")
    prefix.add_argument("--prefix-cache-tune-window", type=int, default=None,
                        metavar="REQUESTS",
                        help="marconi: requests per tuning window (alpha is re-tuned each time "
                             f"one fills); {DEFAULT_TUNE_WINDOW} when unset.")
    return parser


def _from_cli_args(original, cls, args: argparse.Namespace):
    engine_args = original(cls, args)
    engine_args.additional_config = merge_all_settings(engine_args.additional_config, vars(args))
    check_settings(engine_args.additional_config)
    return engine_args


def _serve_cmd(original, args: argparse.Namespace, *rest, **kwargs):
    """`vllm serve`: eviction mistakes end the command with one line and exit code 2.

    vLLM's CLI lets exceptions from the subcommand escape (a traceback), so the command itself is
    wrapped. Flags are checked first, before a port is bound; the model-dependent checks raise
    from ``create_engine_config``, which ``vllm serve`` calls in this process, inside ``cmd``.

    The flags are also folded into ``args.additional_config`` here: extra API-server processes
    (``--api-server-count``) receive ``args`` and call ``from_cli_args`` before they load plugins.
    """
    try:
        args.additional_config = merge_all_settings(getattr(args, "additional_config", None),
                                                    vars(args))
        check_settings(args.additional_config)
        return original(args, *rest, **kwargs)
    except EvictionConfigError as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# --- offline keywords ----------------------------------------------------------------------


def _init_with_keywords(original, self, *args, **kwargs):
    """``EngineArgs(..., kv_eviction_policy=..., kv_budget=...)``.

    ``vllm.LLM(model, **kwargs)`` builds ``EngineArgs(model=model, ..., **kwargs)``, so this is
    the one place that sees its keywords. Timing matters: in a user's own process vLLM loads
    general plugins first in ``EngineArgs.__post_init__``, i.e. *after* the dataclass
    ``__init__`` has rejected unknown keywords. So a patch of ``LLM.__init__`` or of this
    ``__init__`` made by the plugin alone comes too late for the first ``LLM(...)`` of a process.
    Nothing vLLM runs earlier is a general hook (platform plugins are skipped outright when
    ``VLLM_TARGET_DEVICE=cpu``), so the plugin must be installed before: ``vllm_kvevict.register()``
    (idempotent; vLLM's own later call is then a no-op). ``LLM(model, additional_config=
    {"kv_eviction": {...}})`` needs no such call: it is read in ``create_engine_config``, which
    runs after ``__post_init__`` loaded the plugin.
    """
    values = {name: kwargs.pop(name) for name in [*SETTINGS, *PREFIX_SETTINGS] if name in kwargs}
    if any(value is not None for value in values.values()):
        kwargs["additional_config"] = merge_all_settings(kwargs.get("additional_config"), values)
    original(self, *args, **kwargs)
    if values:
        check_settings(self.additional_config)


# --- engine config -------------------------------------------------------------------------


def _create_model_config(original, self):
    model_config = original(self)
    if eviction_config(self.additional_config).evicts:
        check_model_supported(model_config)
    return model_config


def _create_engine_config(original, self, *args, **kwargs):
    """Resolve the engine config; under an evicting policy adapt and check it (see module doc).

    Mutates ``self`` (see :func:`adapt_engine_args`), so a second call gives the same result.
    """
    from vllm.platforms import current_platform

    check_settings(self.additional_config)
    config = eviction_config(self.additional_config)
    prefix = PrefixCacheConfig.from_additional_config(self.additional_config)
    if prefix.is_stock and PREFIX_CACHE_KEY in (self.additional_config or {}):
        # lru: drop our entry, as for policy none below.
        self.additional_config = {k: v for k, v in self.additional_config.items()
                                  if k != PREFIX_CACHE_KEY}
    if not prefix.is_stock:
        return _marconi_engine_config(original, self, prefix, *args, **kwargs)
    if not config.evicts:
        # Policy none: drop our entry so the VllmConfig (and its hash) is stock vLLM's.
        if ADDITIONAL_CONFIG_KEY in (self.additional_config or {}):
            self.additional_config = {k: v for k, v in self.additional_config.items()
                                      if k != ADDITIONAL_CONFIG_KEY}
        return original(self, *args, **kwargs)
    prefix_caching_request = adapt_engine_args(self, config, cuda=current_platform.is_cuda())
    vllm_config = original(self, *args, **kwargs)
    layout = config.layout(vllm_config.cache_config.block_size)  # raises if the budget is short
    _log_resolution(config, layout, prefix_caching_request)
    return vllm_config


def _marconi_engine_config(original, self, prefix: PrefixCacheConfig, *args, **kwargs):
    """Stock vLLM's config with the scheduler that builds the Marconi block pool; refuses what
    would leave it without a prefix cache or replace that scheduler."""
    flag = f"--prefix-cache-eviction-policy {prefix.eviction_policy}"
    if self.enable_prefix_caching is False:
        raise EvictionConfigError(f"{flag} needs prefix caching; drop --no-enable-prefix-caching")
    if self.scheduler_cls is not None:
        raise EvictionConfigError(f"{flag} runs its own scheduler class (vLLM's, over its block "
                                  f"pool); drop --scheduler-cls {self.scheduler_cls}")
    vllm_config = original(self, *args, **kwargs)
    if not vllm_config.cache_config.enable_prefix_caching:
        raise EvictionConfigError(f"{flag} needs prefix caching, which vLLM turned off for "
                                  f"{vllm_config.model_config.model}")
    from vllm_kvevict.engine.prefix_cache import scheduler_qualname

    scheduler = vllm_config.scheduler_config
    scheduler.scheduler_cls = scheduler_qualname(bool(scheduler.async_scheduling))
    return vllm_config


CUSTOM_BACKEND = "CUSTOM"
FULL_GRAPH_MODES = ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")


def adapt_engine_args(engine_args, config: EvictionConfig, cuda: bool):
    """Settings an evicting policy needs, applied to ``engine_args`` before vLLM resolves them;
    returns whether prefix caching had been asked for. Raises :class:`EvictionConfigError` where
    the user asked for something that cannot work.

    Everywhere: block size 32 unless set (the eviction unit), prefix caching off, no async
    scheduling unless set (a step is planned from each row's exact computed tokens), and vLLM's
    V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``: the worker hooks are V1's; workers inherit
    the environment). On CUDA also: the ``CUSTOM`` attention backend (FlashAttention over
    resident pages; stock ``FLASH_ATTN`` would keep every block) and piecewise CUDA graphs (page
    work runs in Python between the captured pieces, see ``EvictingBuilderMixin``).
    """
    if engine_args.block_size is None:
        # The CPU platform would pick 128; a block is the eviction unit, so keep it small.
        engine_args.block_size = DEFAULT_EVICTING_BLOCK_SIZE
    prefix_caching_request = engine_args.enable_prefix_caching
    engine_args.enable_prefix_caching = False
    if engine_args.async_scheduling is None:
        engine_args.async_scheduling = False
    _pin_v1_runner(config)
    if cuda:
        _select_custom_backend(engine_args, config)
        _piecewise_cuda_graphs(engine_args, config)
    return prefix_caching_request


def _pin_v1_runner(config: EvictionConfig) -> None:
    import os

    import vllm.envs as envs

    from vllm_kvevict.engine.page_runtime import V2_RUNNER_ERROR

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise EvictionConfigError(V2_RUNNER_ERROR.format(policy=config.policy))
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if hasattr(envs.__getattr__, "cache_clear"):  # envs cached by an engine built before
        envs.__getattr__.cache_clear()


def _select_custom_backend(engine_args, config: EvictionConfig) -> None:
    requested = engine_args.attention_backend or engine_args.attention_config.backend
    name = getattr(requested, "name", requested)
    if name is None:
        engine_args.attention_backend = CUSTOM_BACKEND
    elif str(name).upper() != CUSTOM_BACKEND:
        raise EvictionConfigError(
            f"--kv-eviction-policy {config.policy} runs its own attention backend on CUDA "
            f"(FlashAttention over resident pages, registered as {CUSTOM_BACKEND}); drop "
            f"--attention-backend {name}")


def _piecewise_cuda_graphs(engine_args, config: EvictionConfig) -> None:
    from vllm.config import CUDAGraphMode

    compilation = engine_args.compilation_config
    mode = compilation.cudagraph_mode
    if mode is None:
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif getattr(mode, "name", str(mode).upper()) in FULL_GRAPH_MODES:
        raise EvictionConfigError(
            f"--kv-eviction-policy {config.policy} runs page work in every layer, which a full "
            f"CUDA graph would skip; use cudagraph_mode PIECEWISE or NONE instead of {mode}")


def _log_resolution(config: EvictionConfig, layout, prefix_caching_request) -> None:
    """The resolved layout, and one line saying why prefix caching is off (a warning instead if
    the user had asked for it)."""
    from vllm.logger import init_logger

    # Under "vllm." so vLLM's logging configuration (handlers, VLLM_LOGGING_LEVEL) applies.
    logger = init_logger("vllm.kvevict")
    logger.info("vllm-kvevict: policy %s, budget %d tokens = %d blocks of %d (%d sink, %d window)",
                config.policy, config.budget, layout.budget_pages, layout.block_size,
                layout.sink_pages, layout.window_pages)
    reason = (f"evicted blocks cannot be shared between requests, so prefix caching is off under "
              f"--kv-eviction-policy {config.policy}")
    if prefix_caching_request:
        logger.warning("vllm-kvevict: ignoring --enable-prefix-caching: %s", reason)
    else:
        logger.info("vllm-kvevict: %s", reason)


def check_model_supported(model_config) -> None:
    """Refuse models whose KV cache is not one decoder-only full-attention cache.

    Raises :class:`EvictionConfigError` naming the model and the reason.
    """
    name = model_config.model
    reason = _unsupported_reason(model_config)
    if reason:
        raise EvictionConfigError(f"{name} {reason}; KV eviction supports decoder-only models "
                                  f"with full (non-MLA) attention only")


def _unsupported_reason(model_config) -> str | None:
    if model_config.is_attention_free:
        return "is attention-free (no KV cache to evict)"
    if model_config.is_hybrid:
        return "is a hybrid (attention + SSM/linear-attention) model"
    if model_config.use_mla:
        return "uses MLA attention"
    if model_config.is_encoder_decoder:
        return "is an encoder-decoder model"
    text_config = model_config.hf_text_config
    layer_types = getattr(text_config, "layer_types", None) or ()
    if model_config.get_sliding_window() or "sliding_attention" in layer_types:
        return "uses sliding-window attention"
    if getattr(text_config, "attention_chunk_size", None):
        return "uses chunked local attention"
    return None
