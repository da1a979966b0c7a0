"""deploy/kubernetes: every manifest against the Kubernetes schemas, and the pods sized from their
own `vllm serve` flags.

Built-in kinds go through `kubernetes-validate` (the API server's OpenAPI schemas, strict: an
unknown field is an error, as with `kubectl apply --validate=strict`). Custom resources
(LeaderWorkerSet, ServiceMonitor) go through the openAPIV3Schema of their published CRDs,
vendored verbatim in deploy/kubernetes/schemas/, made strict the same way: an object schema that
lists its properties and does not preserve unknown fields rejects others (what the API server's
strict field validation does for structural schemas).
"""
import copy
import re

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, serve_words

import kubernetes_validate  # noqa: E402  (the `test` extra; CI installs it)

KUBERNETES_VERSION = "1.31"
MANIFESTS = sorted(p for p in (DEPLOY / "kubernetes").rglob("*.yaml") if "schemas" not in p.parts)
CRDS = sorted((DEPLOY / "kubernetes" / "schemas").glob("*.yaml"))
GIB = 1 << 30
# Host memory a pod needs besides the host stores and /dev/shm (docs/sizing.md).
MIN_PROCESS_OVERHEAD_GIB = 16


def documents():
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())
            if doc is not None]


def strict(schema):
    """A copy of an OpenAPI v3 structural schema in which objects refuse unknown fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    """(apiVersion, kind) -> a jsonschema validator of that custom resource."""
    import jsonschema

    validators = {}
    for path in CRDS:
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = strict(version["schema"]["openAPIV3Schema"])
                jsonschema.Draft7Validator.check_schema(schema)
                key = (f"{group}/{version['name']}", kind)
                validators[key] = jsonschema.Draft7Validator(schema)
    assert {kind for _, kind in validators} == {"LeaderWorkerSet", "ServiceMonitor"}
    return validators


def validate(doc, crd_validators):
    """Raise if ``doc`` does not match its kind's schema (a kind without one fails too)."""
    custom = crd_validators.get((doc["apiVersion"], doc["kind"]))
    if custom is not None:
        custom.validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_recipes_are_there():
    names = {(p.parent.name, p.name) for p in MANIFESTS}
    assert names == {("single-node", "vllm-kvevict.yaml"), ("single-node", "servicemonitor.yaml"),
                     ("multi-node", "vllm-kvevict-lws.yaml")}
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == ["Deployment", "LeaderWorkerSet", "Service", "Service", "ServiceMonitor",
                     "ServiceMonitor"]


@pytest.mark.parametrize("index", range(len(documents())))
def test_manifest_matches_its_schema(index, crd_validators):
    path, doc = documents()[index]
    validate(doc, crd_validators)


def _edited(kind, edit):
    doc = copy.deepcopy(next(d for _, d in documents() if d["kind"] == kind))
    edit(doc)
    return doc


@pytest.mark.parametrize("kind, edit", [
    ("Deployment", lambda d: d["spec"].update(replica=1)),  # misspelt field
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]
     .update(request={"memory": "1Gi"})),
    ("Service", lambda d: d["spec"]["ports"][0].update(port="http")),  # wrong type
    ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"].update(sise=2)),
    ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"].update(size="two")),
    ("LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
     ["containers"][0].update(imag="x")),  # inside the embedded pod template
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="15s")),
])
def test_the_validators_refuse_broken_manifests(kind, edit, crd_validators):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        validate(_edited(kind, edit), crd_validators)


# --- resources follow from the flags ------------------------------------------------------------


def quantity_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert match, f"unexpected memory quantity {text!r}"
    return int(match[1]) << {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, None: 0}[match[2]]


def serving_pods():
    """(name, pod spec, `vllm serve` words, pods per group) for each pod that runs `vllm serve`."""
    pods = []
    for _, doc in documents():
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            pods.append((doc["metadata"]["name"], spec, spec["containers"][0]["args"], 1,
                         [spec]))
        elif doc["kind"] == "LeaderWorkerSet":
            template = doc["spec"]["leaderWorkerTemplate"]
            leader = template["leaderTemplate"]["spec"]
            words = serve_words(" ".join(leader["containers"][0]["args"]))
            pods.append((doc["metadata"]["name"], leader, words, template["size"],
                         [leader, template["workerTemplate"]["spec"]]))
    return pods


@pytest.mark.parametrize("pod", serving_pods(), ids=lambda pod: pod[0])
def test_pod_resources_follow_from_the_host_store(pod, parse_serve):
    """Every pod of a group holds one worker per GPU, each with its own --kv-host-space store
    (pinned on CUDA): memory >= stores + /dev/shm + process overhead; GPUs = TP x PP."""
    from vllm_kvevict.engine.cli import given_settings

    name, _, words, pods_per_group, group_specs = pod
    args = parse_serve(words)
    settings = given_settings(vars(args))
    assert settings["policy"] == "arkvale" and settings["host_space_gib"] > 0, name
    gpus_per_pod = {int(s["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                    for s in group_specs}
    assert len(gpus_per_pod) == 1, f"{name}: leader and workers differ in GPUs"
    gpus = gpus_per_pod.pop()
    assert args.tensor_parallel_size * args.pipeline_parallel_size == gpus * pods_per_group, name
    for spec in group_specs:
        resources = spec["containers"][0]["resources"]
        request = quantity_bytes(resources["requests"]["memory"])
        assert quantity_bytes(resources["limits"]["memory"]) >= request
        shm = sum(quantity_bytes(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"]
                  if v.get("emptyDir", {}).get("medium") == "Memory")
        stores = settings["host_space_gib"] * gpus * GIB
        assert request >= stores + shm + MIN_PROCESS_OVERHEAD_GIB * GIB, (
            f"{name}: {resources['requests']['memory']} < {gpus} x {settings['host_space_gib']} "
            f"GiB host store + {shm / GIB:g} GiB shm + {MIN_PROCESS_OVERHEAD_GIB} GiB")


# --- wiring: ServiceMonitor -> Service -> pods ---------------------------------------------------


def pod_labels(doc):
    """Labels of the pods that serve HTTP: a Deployment's, or a LeaderWorkerSet's leaders (LWS
    adds its name label to every pod it creates)."""
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["metadata"]["labels"], doc["spec"]["template"]["spec"]
    template = doc["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    labels = {**template["metadata"]["labels"],
              "leaderworkerset.sigs.k8s.io/name": doc["metadata"]["name"]}
    return labels, template["spec"]


@pytest.mark.parametrize("recipe", ["single-node", "multi-node"])
def test_service_monitor_reaches_the_server_port(recipe):
    docs = [doc for path, doc in documents() if path.parent.name == recipe]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "LeaderWorkerSet")]
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    labels, pod = pod_labels(workload)
    assert service["spec"]["selector"].items() <= labels.items()
    container = pod["containers"][0]
    target = port["targetPort"]
    assert any(p["containerPort"] == 8000 and target in (p.get("name"), p["containerPort"])
               for p in container["ports"])
    words = container["args"] if workload["kind"] == "Deployment" else serve_words(
        " ".join(container["args"]))
    assert "--port=8000" in words or words[words.index("--port") + 1] == "8000"
