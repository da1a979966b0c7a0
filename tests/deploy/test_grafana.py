"""deploy/grafana: the dashboard loads as a Grafana dashboard model and charts the series that
vLLM and the plugin export.

The model is checked against the JSON schemas Grafana publishes in its foundation SDK (vendored
in deploy/grafana/schemas/): the dashboard, each time-series panel's options and each Prometheus
query. Every query is parsed as PromQL (`promql-parser`, Grafana's variables substituted) and the
metric names are read from the parsed selectors.
"""
import importlib
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import promql_parser  # the `test` extra
import pytest

from tests.deploy.conftest import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "vllm-kvevict-dashboard.json"
SCHEMAS = DEPLOY / "grafana" / "schemas"
# vLLM's own series the dashboard shows beside the plugin's (names as exported).
VLLM_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
               "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds",
               "vllm:inter_token_latency_seconds")
EXPOSITION_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def schema(name: str, definition: str | None = None) -> dict:
    loaded = json.loads((SCHEMAS / f"{name}.jsonschema.json").read_text())
    if definition is not None:
        loaded = {**loaded, "$ref": f"#/definitions/{definition}"}
    return loaded


def family(series: str) -> str:
    """A metric family's name from an exposed series name (``x_total``, ``x_bucket`` -> ``x``)."""
    for suffix in EXPOSITION_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def charts(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


# Values Grafana substitutes for the dashboard's variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model_name": ".*"}


def parse_promql(expr: str):
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown variable in {expr!r}"
    return promql_parser.parse(expr)


def selector_names(node) -> set[str]:
    """Metric names of every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        return {node.name}
    children = []
    for attribute in ("expr", "lhs", "rhs", "param", "vector_selector"):
        children.append(getattr(node, attribute, None))
    children.extend(getattr(node, "args", None) or ())
    return set().union(*(selector_names(c) for c in children if isinstance(c, promql_parser.Expr)))


def series_in(dashboard) -> set[str]:
    exprs = [t["expr"] for p in charts(dashboard) for t in p["targets"]]
    return set().union(*(selector_names(parse_promql(expr)) for expr in exprs))


def test_queries_are_promql():
    with pytest.raises(ValueError):
        parse_promql("sum by (rank (rate(vllm:num_requests_running[$__rate_interval]))")
    names = selector_names(parse_promql(
        'histogram_quantile(0.5, sum by (le) (rate(a_bucket{model_name=~"$model_name"}[5m])))'
        " / sum(b) + c_total"))
    assert names == {"a_bucket", "b", "c_total"}


def test_dashboard_matches_grafanas_schema(dashboard):
    jsonschema.Draft7Validator(schema("dashboard")).validate(dashboard)
    options = jsonschema.Draft7Validator(schema("timeseries", "Options"))
    query = jsonschema.Draft7Validator(schema("prometheus"))
    assert charts(dashboard)
    for panel in charts(dashboard):
        assert panel["type"] == "timeseries", panel["title"]
        options.validate(panel["options"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            query.validate(target)


def test_schema_refuses_a_broken_dashboard(dashboard):
    wide = {**charts(dashboard)[0], "gridPos": {"x": 0, "y": 0, "w": 30, "h": 8}}
    broken = {**dashboard, "panels": [wide]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema("dashboard")).validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema("prometheus")).validate({"refId": "A", "exp": "up"})


def test_panels_have_unique_ids_and_do_not_overlap(dashboard):
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = {}
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_queries_use_the_template_variables(dashboard):
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model_name"}
    for panel in charts(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert 'model_name=~"$model_name"' in target["expr"], target["expr"]


def test_vllm_series_are_vllms_own(dashboard):
    """vLLM's series shown are the ones vLLM 0.32 defines (read from its metrics logger)."""
    vllm_dir = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    defined = set(re.findall(r'name="(vllm:[a-z_]+)"',
                             (vllm_dir / "v1" / "metrics" / "loggers.py").read_text()))
    shown = {family(s) for s in series_in(dashboard) if not s.startswith("vllm:kvevict_")}
    assert {family(s) for s in VLLM_SERIES} <= shown
    assert shown <= defined, shown - defined


def test_every_plugin_metric_is_charted(dashboard):
    """Each name in the plugin's METRIC_NAMES is charted, and nothing else under vllm:kvevict_."""
    if importlib.util.find_spec("vllm_kvevict.engine.metrics") is None:
        pytest.skip("vllm_kvevict.engine.metrics (METRIC_NAMES) is not there yet")
    metrics = importlib.import_module("vllm_kvevict.engine.metrics")
    exported = {family(name) for name in metrics.METRIC_NAMES}
    shown = {family(s) for s in series_in(dashboard) if s.startswith("vllm:kvevict_")}
    assert exported == shown, (exported - shown, shown - exported)
