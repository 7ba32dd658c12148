"""Checks of deploy/: the Kubernetes manifests against the Kubernetes API schema
(kubernetes-validate) and against the settings they name, the Prometheus rules with promtool,
and the metric names in the rules and the Grafana dashboard against what the code exports.

Nothing here starts a cluster: the manifests are checked as the API server would admit them,
the rules as Prometheus would load and evaluate them (``promtool test rules`` runs every alert
on series of its own, deploy/prometheus/alerts.test.yml).

This half needs no broker and starts no process; tests/integration/test_deploy.py has the rest."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import triage.consumer.metrics  # noqa: F401 - registers the worker's metrics in REGISTRY
from tests.helpers import PROMETHEUS
from triage.consumer.drift_monitor import DriftMetrics
from triage.consumer.window_stage import WindowMetrics, chosen_features
from triage.model.windows import stores as window_stores
from triage.settings import Settings, settings_rows

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
GRAFANA = ROOT / "deploy" / "grafana"
KUBERNETES_VERSION = "1.33.0"  # the manifests' target; kubernetes-validate ships its schema

# Metrics a rule or panel may use that triage does not export: Prometheus's own scrape health
# and kube-state-metrics' container restarts.
EXTERNAL_METRICS = {"up", "kube_pod_container_status_restarts_total"}


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def by_kind(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_every_builtin_kind_is_valid_for_the_target_kubernetes_version() -> None:
    checked = set()
    for path, doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: checked below
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} "
                        f"at {'.'.join(map(str, exc.path))}")
        checked.add(doc["kind"])
    assert {"Deployment", "PodDisruptionBudget", "ConfigMap", "Secret",
            "PersistentVolumeClaim"} <= checked, checked


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def config_settings(tmp_path: Path) -> Settings:
    """The ConfigMap's settings as a pod gets them: each ``*_FILE`` names a file of the
    triage-kafka Secret (here written to ``tmp_path``). Raises if a value does not parse."""
    config = dict(by_kind("ConfigMap", "triage-config")["data"])
    secret = by_kind("Secret", "triage-kafka")["stringData"]
    for name, path in config.items():
        if name.endswith("_FILE"):
            key = Path(path).name
            assert key in secret, f"{name}: no key {key!r} in the triage-kafka Secret"
            (tmp_path / key).write_text(secret[key])
            config[name] = str(tmp_path / key)
    return Settings.from_env(config)


def test_the_config_names_only_real_settings_and_the_pods_serve_their_probes(
        tmp_path: Path) -> None:
    config = by_kind("ConfigMap", "triage-config")["data"]
    known = {env for env, _, _ in settings_rows()}
    secrets = {env + "_FILE" for env, _, doc in settings_rows() if "_FILE" in doc}
    unknown = set(config) - known - secrets
    assert not unknown, f"not settings of triage: {unknown}"
    settings = config_settings(tmp_path)  # the values parse and pass validation
    for name, port in (("triage-scorer", settings.scorer.metrics_port),
                       ("triage-windows", settings.scorer.metrics_port),
                       ("triage-drift-monitor", settings.drift.drift_metrics_port)):
        pod = by_kind("Deployment", name)["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert {"configMapRef": {"name": "triage-config"}} in container["envFrom"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port, (name, ports)
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                            ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
    scorer = by_kind("Deployment", "triage-scorer")["spec"]["template"]["spec"]
    assert scorer["containers"][0]["args"][0] == "worker"  # one worker per pod, no supervisor
    # SIGTERM drains a batch: hooks up to the processing deadline, then the wait for the
    # broker's acknowledgements, then the commit.
    assert scorer["terminationGracePeriodSeconds"] * 1000 > \
        settings.core.processing_deadline_ms + settings.scorer.delivery_timeout_ms
    assert "replicas" not in by_kind("Deployment", "triage-scorer")["spec"]  # KEDA's to set
    # Static membership by pod name: a real setting, from the pod's own name.
    env = {e["name"]: e for e in scorer["containers"][0]["env"]}
    assert "TRIAGE_INSTANCE_ID" in known
    assert env["TRIAGE_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for path in (config["TRIAGE_SASL_PASSWORD_FILE"], config["TRIAGE_SSL_CA_LOCATION"]):
        mount = next(m for m in scorer["containers"][0]["volumeMounts"]
                     if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in scorer["volumes"] if v["name"] == mount["name"])
        key = path.removeprefix(mount["mountPath"] + "/")
        assert key in by_kind("Secret", volume["secret"]["secretName"])["stringData"]


def test_the_feature_stage_runs_no_more_instances_than_partitions_and_drains_a_turn(
        tmp_path: Path) -> None:
    settings = config_settings(tmp_path)
    deployment = by_kind("Deployment", "triage-windows")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["windows"]
    # Two let one take over from the other; the group has the orders topic's partitions and
    # each store's repartition topic's to share, and an instance beyond those would own none.
    stores = window_stores(chosen_features(settings.windows.names()))
    assert 2 <= deployment["spec"]["replicas"] <= settings.topics.orders_partitions * (
        1 + len(stores))
    # SIGTERM finishes the turn: its transaction waits for the acknowledgements, then commits.
    assert pod["terminationGracePeriodSeconds"] * 1000 > settings.scorer.delivery_timeout_ms
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])  # restored, not kept
    pdb = by_kind("PodDisruptionBudget", "triage-windows")["spec"]
    assert pdb["selector"] == deployment["spec"]["selector"]
    assert pdb["maxUnavailable"] == 1


def test_the_gateway_serves_its_probes_and_metrics_on_the_port_it_listens_on() -> None:
    deployment = by_kind("Deployment", "triage-gateway")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve" and "--reference" not in args  # joined with the streams
    port = int(args[args.index("--port") + 1])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    service = by_kind("Service", "triage-gateway")["spec"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == "http"


def test_keda_scales_the_scorer_group_on_its_lag_within_the_partition_count(
        tmp_path: Path) -> None:
    config = config_settings(tmp_path)
    scaled = by_kind("ScaledObject", "triage-scorer")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "triage-scorer"
    assert by_kind("Deployment", spec["scaleTargetRef"]["name"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] \
        <= config.topics.orders_partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    assert meta["consumerGroup"] == config.scorer.group_id
    assert meta["topic"] == config.topics.orders_topic
    assert meta["bootstrapServers"] == config.connection.bootstrap_servers
    assert int(meta["lagThreshold"]) >= config.scorer.batch_size
    auth = by_kind("TriggerAuthentication", trigger["authenticationRef"]["name"])
    secret = by_kind("Secret", "triage-kafka")["stringData"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == "triage-kafka" and ref["key"] in secret, ref


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


_FUNCTIONS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "deriv", "delta",
    "changes", "absent", "histogram_quantile", "and", "or", "unless", "by", "without", "on",
    "ignoring", "bool", "offset", "topk", "bottomk", "label_replace", "clamp_min",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, grouping clauses, numbers and functions are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr)) - _FUNCTIONS
    return {n for n in names if not re.fullmatch(r"\d+[smhdwy]?|e\d+", n)}


def exported_metrics() -> dict[str, bool]:
    """Every sample name the worker, the feature stage and the drift monitor export -> True
    when the metric has no labels (so a running process always exports it, even before any
    event)."""
    names: dict[str, bool] = {}
    for registry in (REGISTRY, DriftMetrics(CollectorRegistry()).registry,
                     WindowMetrics().registry):
        for family in registry.collect():
            for sample in family.samples:
                names[sample.name] = not sample.labels
            if not family.samples:  # a labelled metric before its first use
                for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                    names.setdefault(family.name + suffix, False)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((GRAFANA / "dashboards" / "triage.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_metric_in_the_rules_and_the_dashboard_is_exported() -> None:
    exported = exported_metrics()
    for source, exprs in (("alerts.yml", [r["expr"] for r in alert_rules()]),
                          ("dashboards/triage.json", dashboard_exprs())):
        used = set().union(*(metric_names(e) for e in exprs))
        assert used, source
        unknown = used - set(exported) - EXTERNAL_METRICS
        assert not unknown, f"{source} uses metrics nothing exports: {sorted(unknown)}"


def test_every_alert_on_a_triage_metric_has_an_absent_twin() -> None:
    exported = exported_metrics()
    rules = alert_rules()
    absent = {name for r in rules for inner in re.findall(r"absent\(([^)]*\))", r["expr"])
              for name in metric_names(inner)}
    # A twin watches a metric a running process always exports; else it fires on a healthy one.
    assert absent and all(exported.get(name) for name in absent), absent
    for rule in rules:
        if "absent(" in rule["expr"]:
            continue
        ours = {n for n in metric_names(rule["expr"]) if n in exported}
        if not ours:
            continue  # external metrics only (kube-state-metrics)
        jobs = set(re.findall(r'job="([^"]+)"', rule["expr"]))
        twins = [r for r in rules if "absent(" in r["expr"]
                 and jobs <= set(re.findall(r'job="([^"]+)"', r["expr"]))]
        assert twins, f"{rule['alert']}: no absent() alert on a metric of {jobs}"


def test_prometheus_and_grafana_in_compose_mount_what_exists() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for service in ("prometheus", "grafana"):
        for volume in compose[service]["volumes"]:
            assert (ROOT / volume.split(":")[0]).exists(), (service, volume)
    config = yaml.safe_load((PROMETHEUS / "prometheus-compose.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"triage-scorer", "triage-windows", "triage-drift-monitor", "triage-gateway"}
    gateway = next(job for job in config["scrape_configs"] if job["job_name"] == "triage-gateway")
    command = compose["gateway"]["command"]
    assert gateway["static_configs"][0]["targets"] == [
        f"gateway:{command[command.index('--port') + 1]}"]
    consumer = compose["consumer"]["environment"]
    scrape = {job["job_name"]: job for job in config["scrape_configs"]}
    assert consumer["TRIAGE_METRICS_PORT"] == str(
        scrape["triage-scorer"]["dns_sd_configs"][0]["port"])
    windows = compose["windows"]["command"]
    assert windows[0] == "windows" and windows[windows.index("--metrics-port") + 1] == str(
        scrape["triage-windows"]["dns_sd_configs"][0]["port"])
    assert scrape["triage-windows"]["dns_sd_configs"][0]["names"] == ["windows"]
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
