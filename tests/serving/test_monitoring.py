"""deploy/monitoring/: every PromQL expression of the Grafana dashboard and the alert rules parses and asks
only for metrics a replica exports; the scrape configuration finds the replicas of deploy/k8s/serve.yaml;
docs/serving.md describes every panel and every alert."""

import json
import re

import promql_parser
import yaml

from liverseg.serving.metrics import Metrics
from support.paths import REPO

MONITORING = REPO / "deploy" / "monitoring"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$pod": ".*"}  # what Grafana puts in before Prometheus parses


def _exported() -> set[str]:
    """Sample names a replica's /metrics can hold (families without samples yet included), and `up`."""
    names = {"up"}
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def _metrics_in(expr: str) -> list[str]:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    found: list[str] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)  # ValueError on a syntax error
    return found


def _dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def _rules() -> list[dict]:
    return yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"][0]["rules"]


def test_every_expression_parses_and_asks_for_exported_metrics():
    exported = _exported()
    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]] + [r["expr"] for r in _rules()]
    assert len(exprs) > 25
    unknown = {name for e in exprs for name in _metrics_in(e)} - exported
    assert not unknown, unknown
    used = {
        name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for e in exprs
        for name in _metrics_in(e)
    }
    liverseg = {
        n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for n in exported
        if n.startswith("liverseg_")
    }
    assert liverseg - used <= {"liverseg_response_bytes_total"}, liverseg - used  # every figure is on show


def test_each_alert_is_complete_and_the_docs_describe_panels_and_alerts():
    doc = (REPO / "docs" / "serving.md").read_text()
    for rule in _rules():
        assert rule["for"] and rule["labels"]["severity"] in {"page", "ticket", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert f"`{rule['alert']}`" in doc, rule["alert"]
    titles = [p["title"] for p in _dashboard()["panels"] if p["type"] != "row"]
    assert len(set(titles)) == len(titles)
    missing = [t for t in titles if f"**{t}**" not in doc]
    assert not missing, missing
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(set(ids)) == len(ids)


def test_the_scrape_configuration_finds_the_replicas():
    objs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "serve.yaml").read_text()))
    sts = next(o for o in objs if o["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = next(p for p in container["ports"] if p["name"] == "http")
    notes = pod["metadata"]["annotations"]
    assert notes == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port["containerPort"]),
        "prometheus.io/path": "/metrics",
    }
    (monitor,) = yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    prom = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert all((MONITORING / f).exists() for f in prom["rule_files"])
    (job,) = prom["scrape_configs"]
    assert any(r.get("regex") == sts["metadata"]["name"] for r in job["relabel_configs"])
    jobs_in_alerts = {m for r in _rules() for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert jobs_in_alerts == {job["job_name"]}
    (policy,) = yaml.safe_load_all((MONITORING / "networkpolicy.yaml").read_text())
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "liverseg-serve"}
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": port["containerPort"]}]
