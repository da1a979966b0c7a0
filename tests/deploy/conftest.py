"""Fixtures for the deploy/ checks: no engine starts; the `vllm serve` parser is built once."""
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="session")
def parse_serve():
    """Parse ``vllm serve`` arguments (the words after ``vllm serve``) with the parser `vllm`
    builds, the plugin's flags included; returns the argparse namespace."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_kvevict

    vllm_kvevict.register()
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))

    def parse(words):
        return parser.parse_args(["serve", *words])

    return parse


def serve_words(command: str) -> list[str]:
    """The arguments of the ``vllm serve`` line of a shell script (``exec`` allowed)."""
    for line in command.splitlines():
        words = shlex.split(line)
        if words[:1] == ["exec"]:
            words = words[1:]
        if words[:2] == ["vllm", "serve"]:
            return words[2:]
    raise AssertionError(f"no `vllm serve` line in {command!r}")
