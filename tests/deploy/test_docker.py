"""deploy/docker: the CPU image is built by the set-up script CI runs, and both images start
`vllm serve` with flags the real parser accepts. (No Docker daemon is needed: the Dockerfiles are
read, not built.)"""
import json
import re
import shlex

import yaml

from tests.deploy.conftest import DEPLOY, REPO

CPU = DEPLOY / "docker" / "Dockerfile.cpu"
CUDA = DEPLOY / "docker" / "Dockerfile.cuda"


def instructions(path):
    """(INSTRUCTION, rest) pairs, continuation lines joined and comments dropped."""
    joined, out = "", []
    for line in path.read_text().splitlines():
        if not joined and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        keyword, _, rest = joined.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        joined = ""
    return out


def values(path, keyword):
    return [rest for kw, rest in instructions(path) if kw == keyword]


def env(path):
    pairs = {}
    for rest in values(path, "ENV"):
        pairs.update(word.split("=", 1) for word in shlex.split(rest))
    return pairs


def test_cpu_image_installs_through_the_setup_script_only():
    runs = values(CPU, "RUN")
    installs = [run for run in runs if "setup.sh" in run]
    assert installs == ["bash scripts/setup.sh"]
    assert not [run for run in runs if re.search(r"\bpip\b|\buv\b|\bvllm\b", run)], runs
    # CI runs that same script: .ci/run -> make test -> make setup -> bash scripts/setup.sh
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: setup\b", makefile, re.MULTILINE)
    assert re.search(r"^setup:\n\tbash scripts/setup.sh$", makefile, re.MULTILINE)


def test_cpu_image_copies_what_the_setup_script_reads():
    copied = set()
    for rest in values(CPU, "COPY"):
        *sources, _ = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), source
            copied.add(source.rstrip("/"))
    setup = (REPO / "scripts" / "setup.sh").read_text()
    needed = {"pyproject.toml", "README.md", "vllm_kvevict"}
    needed |= {path.split("/")[0] for path in re.findall(r"\bscripts/[\w.]+", setup)}
    assert needed <= copied, needed - copied


def _entry(path):
    (entry,) = values(path, "ENTRYPOINT")
    return json.loads(entry)


def test_cpu_image_serves_the_bundled_model_with_arkvale(parse_serve):
    from vllm_kvevict.engine.cli import given_settings

    entry = _entry(CPU)
    assert entry[:2] == ["vllm", "serve"]
    assert entry[2] == env(CPU)["KVEVICT_MODEL_DIR"]  # where the set-up converted the model
    (workdir,) = values(CPU, "WORKDIR")
    words = [str(REPO / w) if w.startswith("configs/") else w for w in entry[2:]]
    args = parse_serve(words)
    assert given_settings(vars(args))["policy"] == "arkvale"  # from configs/arkvale.yaml
    assert args.kv_budget == 512 and args.host == "0.0.0.0"
    # a flag the config file also sets makes vLLM log "Found duplicate keys" at every start
    config = yaml.safe_load((REPO / entry[entry.index("--config") + 1]).read_text())
    flags = {w.split("=")[0] for w in entry if w.startswith("--")}
    assert not flags & {f"--{key}" for key in config}
    assert workdir == "/opt/vllm-kvevict"


def test_cuda_image_is_vllms_openai_image_for_the_pinned_version(parse_serve):
    from vllm_kvevict.engine.cli import given_settings

    (image_arg,) = [v for v in values(CUDA, "ARG") if v.startswith("VLLM_IMAGE=")]
    image = image_arg.split("=", 1)[1]
    assert values(CUDA, "FROM") == ["${VLLM_IMAGE}"]
    pyproject = (REPO / "pyproject.toml").read_text()
    (pinned,) = re.findall(r'^gpu = \["vllm==([\d.]+)"\]$', pyproject, re.MULTILINE)
    assert image == f"vllm/vllm-openai:v{pinned}"
    (install,) = [run for run in values(CUDA, "RUN") if "pip install" in run]
    assert '"/opt/vllm-kvevict[gpu]"' in install
    assert _entry(CUDA) == ["vllm", "serve"]
    (cmd,) = values(CUDA, "CMD")
    args = parse_serve(json.loads(cmd))
    settings = given_settings(vars(args))
    assert settings["policy"] == "arkvale"
    # the single-node Kubernetes recipe serves the same model with the same settings
    deployment = next(doc for doc in yaml.safe_load_all(
        (DEPLOY / "kubernetes" / "single-node" / "vllm-kvevict.yaml").read_text())
        if doc["kind"] == "Deployment")
    pod = parse_serve(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert given_settings(vars(pod)) == settings
    assert (pod.model_tag, pod.max_model_len, pod.max_num_seqs) == (
        args.model_tag, args.max_model_len, args.max_num_seqs)
