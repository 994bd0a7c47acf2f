"""The deployment files agree with the code: every metric the dashboard and the rules query is
one the service exports, every setting they set is a real one, every probe path and CLI flag
exists, and the dashboard still imports. Text checks, so they run in milliseconds (the builds are
parsed and validated in test_kustomize.py); the metric names come from the service's real
exposition.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from marginwatch.artifact.schema import ThresholdRuleSpec
from marginwatch.artifact.store import current_dir, default_store, read_record
from marginwatch.artifact.traffic import TrafficCheck
from marginwatch.service.admission import Admission
from marginwatch.service.engine import Prediction
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.settings import Settings
from marginwatch.service.state_metrics import ModelState

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
RULES = DEPLOY / "prometheus" / "rules.yml"
ALERT_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "marginwatch-dashboard.json"
COMPOSE = DEPLOY / "compose"

# A metric name not preceded by `:` (which would make it part of a recording rule's name).
METRIC_NAME = re.compile(r"(?<![\w:])marginwatch_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
# Paths under deploy/kubernetes: the base's manifests, and the one-off Jobs beside it.
KINDS = {
    "base/namespace.yaml": ["Namespace"],
    "base/configmap.yaml": ["ConfigMap"],
    "base/pvc.yaml": ["PersistentVolumeClaim"],
    "base/deployment.yaml": ["Deployment"],
    "base/service.yaml": ["Service"],
    "base/hpa.yaml": ["HorizontalPodAutoscaler"],
    "base/pdb.yaml": ["PodDisruptionBudget"],
    "base/networkpolicy.yaml": ["NetworkPolicy"],
    "base/calibration-cronjob.yaml": ["CronJob", "CronJob"],
    "base/kustomization.yaml": ["Kustomization"],
    "calibration-sharded-job.yaml": ["Job", "Job"],
}


def service_source() -> str:
    return "\n".join(path.read_text() for path in sorted((ROOT / "service").glob("*.py")))


# A traffic check of the served version as the calibration job writes it (artifact/traffic.py).
TRAFFIC_CHECK = TrafficCheck.model_validate(
    {
        "model_name": "m", "version": "v1", "created_at": "2026-12-02T01:00:00+00:00",
        "traffic_since": 0.0, "traffic_until": 86400.0, "available_points": 900, "seed": 0,
        "threat_model": {"norm": "linf", "eps": 0.1},
        "attacks": [{"name": "fmn", "steps": 100, "succeeded": 100}], "censored": 0,
        "nonrobust": {"value": 0.3, "ci_low": 0.26, "ci_high": 0.34, "count": 150, "total": 500},
        "flagged": {"value": 0.28, "ci_low": 0.24, "ci_high": 0.32, "count": 140, "total": 500},
        "recall": 0.85, "precision": 0.9, "false_positive_rate": 0.05, "kendall_tau": 0.6,
        "auroc": 0.9, "live_gauge": 0.6, "ratios_agree": True, "duration_s": 60.0,
    }
)  # fmt: skip


def exposition() -> str:
    """The service's real exposition once it has served a batch and a request."""
    metrics = ServiceMetrics(live_window_predictions=10, traffic_sample_rate=0.01)
    record = read_record(current_dir(default_store(), "fmnist-cnn-pgd"))
    scores = np.array([0.1, 2.0], dtype=np.float32)
    prediction = Prediction.without_answers(
        np.zeros((2, 10), dtype=np.float32), scores, np.zeros(2, dtype=np.int64),
        scores < record.threshold, np.zeros(2, dtype=bool),
    )  # fmt: skip
    metrics.observe_version("m", record)
    metrics.models.watch(lambda: [ModelState("m", desired="v2", served="v1")])
    metrics.observe_refusal("m")
    metrics.observe_batch("m", record, prediction, 0.001)
    metrics.observe_request("m", "v1_predict", 200, 0.002)
    metrics.observe_request("m", "v1_predict", 503, 0.9, shed="deadline")
    metrics.watch_admission(
        Admission(max_requests=2, max_body_bytes=1000, max_waiting=4, timeout_s=1.0)
    )
    metrics.traffic.watch_queue("m", lambda: 0)
    metrics.track("m")  # the sampling and traffic-check counters exist from here, at 0
    metrics.observe_traffic_check("m", TRAFFIC_CHECK)
    return metrics.exposition().decode()


def exported_labels() -> dict[str, set[str]]:
    """Each sample name of the real exposition, with the label names its samples carry."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def exported_metrics() -> set[str]:
    """Sample names in the service's real exposition."""
    return set(exported_labels())


def dashboard_queries() -> Iterator[str]:
    def walk(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return walk(json.loads(DASHBOARD.read_text()))


def documents(path: Path) -> list[str]:
    return [doc for doc in re.split(r"^---\s*$", path.read_text(), flags=re.MULTILINE) if doc]


def test_exported_metrics_are_found() -> None:
    names = exported_metrics()
    assert {"marginwatch_requests_total", "marginwatch_score_bucket"} <= names
    assert "marginwatch_calibration_info" in names


def alert_test_series_text() -> str:
    return "\n".join(path.read_text() for path in ALERT_TESTS)


def alert_test_series() -> str:
    """The series names that the promtool unit tests feed the rules."""
    return "\n".join(
        re.sub(r"\{.*", "", line)
        for line in re.findall(r"series: '([^']+)'", alert_test_series_text())
    )


# Labels that Prometheus adds to every scraped series (the target's), not the service.
TARGET_LABELS = {"job", "instance"}
# `metric{a="x", b=~"y"}`: the metric's name and its matchers; and the label lists of
# aggregations and vector matching: `by (a, b)`, `ignoring (a)`, `group_left (a)`, ...
SELECTOR = re.compile(r"(?<![\w:])(marginwatch_[a-z0-9_]+)\{([^}]*)\}")
MATCHER_NAME = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def queried_labels(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The label names `expr` matches on, per metric, and those it groups or matches by."""
    matched: dict[str, set[str]] = {}
    for name, matchers in SELECTOR.findall(expr):
        unquoted = re.sub(r'"[^"]*"', '""', matchers)
        matched.setdefault(name, set()).update(MATCHER_NAME.findall(unquoted))
    grouped = {label.strip() for labels in LABEL_LIST.findall(expr) for label in labels.split(",")}
    return matched, grouped - {""}


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "rules", "alert tests"])
def test_every_queried_label_is_exported(source: str) -> None:
    """Each query selects by labels its metric carries in the real exposition, and groups or
    matches by labels one of its metrics carries; the alert tests feed series with only
    those labels (plus the scrape target's)."""
    exported = exported_labels()
    if source == "alert tests":
        series = re.findall(r"series: '([^{']+)\{([^}]*)\}'", alert_test_series_text())
        queries = [f"{name}{{{labels}}}" for name, labels in series]
    else:
        queries = list(dashboard_queries()) if source == "dashboard" else rule_expressions()
    checked = 0
    for expr in queries:
        matched, grouped = queried_labels(expr)
        known = set(TARGET_LABELS)
        for name, labels in matched.items():
            assert labels <= exported[name] | TARGET_LABELS, f"{name}: {sorted(labels)}"
            known |= exported[name]
            checked += len(labels)
        names = set(METRIC_NAME.findall(expr))
        known |= {label for name in names for label in exported.get(name, ())}
        # a recording rule's series carries `model` alone (and `version` for the checks)
        known |= {"model"} if RECORDED_NAME.search(expr) else set()
        assert grouped <= known, f"{sorted(grouped - known)} in {expr}"
        checked += len(grouped)
    assert checked  # the queries use labels, so the loop checked something


@pytest.mark.parametrize("source", ["dashboard", "rules", "alert tests"])
def test_every_queried_metric_is_exported(source: str) -> None:
    text = {
        "dashboard": "\n".join(dashboard_queries()),
        "rules": RULES.read_text(),
        "alert tests": alert_test_series(),
    }[source]
    used = set(METRIC_NAME.findall(text))
    assert used, f"no marginwatch metric found in the {source}"
    assert used <= exported_metrics(), f"not exported: {sorted(used - exported_metrics())}"


def test_recording_rules_used_are_defined() -> None:
    rules = RULES.read_text()
    defined = set(re.findall(r"^\s*- record: (\S+)$", rules, re.MULTILINE))
    used = set(RECORDED_NAME.findall(rules + "\n".join(dashboard_queries())))
    assert used <= defined, f"undefined recording rules: {sorted(used - defined)}"
    assert re.findall(r"^\s*- alert: \w+$", rules, re.MULTILINE)


def test_label_values_and_endpoints_exist_in_the_service() -> None:
    text = RULES.read_text() + "\n".join(dashboard_queries())
    source = service_source()
    values = set(re.findall(r'\b(?:brittle|result|state|served)="(\w+)"', text))
    endpoint_sets = set(re.findall(r'endpoint=~"([\w|]+)"', text))
    assert values and endpoint_sets  # the queries use some, so the loops below check something
    for value in values:
        assert f'"{value}"' in source, value
    for endpoints in endpoint_sets:
        for endpoint in endpoints.split("|"):
            # an HTTP route's handler, or a gRPC method's `@rpc("<endpoint>", ...)` label
            assert f"def {endpoint}(" in source or f'@rpc("{endpoint}"' in source, endpoint


def test_dashboard_shape() -> None:
    """What Grafana needs to import it: unique panel ids, panels on the 24-column grid without
    overlapping, a Prometheus datasource (the dashboard's own variable) on every panel and
    target, targets with unique refIds and an expression that queries a marginwatch metric
    (that the metric exists: test_every_queried_metric_is_exported), variables defined."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    all_panels = dashboard["panels"]
    assert len({panel["id"] for panel in all_panels}) == len(all_panels)
    cells: set[tuple[int, int]] = set()
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    panels = [panel for panel in all_panels if panel["type"] != "row"]
    assert any(panel["type"] == "heatmap" for panel in panels)
    for panel in panels:
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            assert target["datasource"] == datasource, panel["title"]
            assert METRIC_NAME.search(target["expr"]), f"{panel['title']}: {target['expr']}"
            for name in re.findall(r"\$(\w+)", target["expr"]):
                assert name in variables or name.startswith("__"), name


def test_dashboard_has_budget_and_class_panels() -> None:
    """Robust accuracy by budget (calibration and live, `eps` in the legend), the brittle
    fraction by predicted class (top k), and the alerting budget's panel on served="true"."""
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    budgets = panels["Robust accuracy vs budget"]["targets"]
    assert [METRIC_NAME.findall(t["expr"])[0] for t in budgets] == [
        "marginwatch_calibration_robust_accuracy_ratio",
        "marginwatch_live_robust_accuracy_ratio",
    ]
    for target in budgets:
        assert "by (model, eps)" in target["expr"] and "{{eps}}" in target["legendFormat"]
    (by_class,) = panels["Brittle fraction by predicted class (top 10)"]["targets"]
    assert by_class["expr"].startswith("topk(10, ")
    assert by_class["expr"].count("sum by (model, class) (rate(marginwatch_predictions_total") == 2
    assert "{{class}}" in by_class["legendFormat"]
    served = panels["Live vs calibrated robust accuracy"]["targets"]
    assert all('served="true"' in target["expr"] for target in served)


def test_dashboard_legends_name_labels_of_their_query() -> None:
    """A legend's `{{label}}` is one its query's result carries: one it aggregates by, or (no
    aggregation) one of its metric's exported labels."""
    exported = exported_labels()
    checked = 0
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            _, grouped = queried_labels(target["expr"])
            metrics = METRIC_NAME.findall(target["expr"])
            carried = grouped or TARGET_LABELS.union(*(exported[name] for name in metrics))
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= carried, f"{panel['title']}: {sorted(legend - carried)}"
            checked += len(legend)
    assert checked


def test_dashboard_has_readiness_and_version_panels() -> None:
    """Per-model readiness and version skew (issue 12): the panels query those series."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}
    assert "marginwatch_model_ready" in exprs["Ready replicas per model"]
    skew = exprs["Served versions per model"]
    assert 'marginwatch_model_version_info{state="served"' in skew
    assert "unless ignoring (state)" in exprs["Replicas not serving the desired version"]
    # The model list comes from the readiness gauge: a model that is not ready is listed too.
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    (model,) = [v for v in variables if v["name"] == "model"]
    assert model["definition"] == "label_values(marginwatch_model_ready, model)"


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL: promtool parses each one as a recording rule,
    with Grafana's variables replaced by values that Grafana would put there."""
    replacements = {"$__rate_interval": "1m", "$model": ".+"}
    rules = []
    for index, query in enumerate(q for q in dashboard_queries() if "label_values" not in q):
        expr = query
        for variable, value in replacements.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, query
        rules.append({"record": f"dashboard:query_{index}:promql", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.mark.parametrize(("name", "kinds"), sorted(KINDS.items()))
def test_manifest_kinds(name: str, kinds: list[str]) -> None:
    path = K8S / name
    assert "\t" not in path.read_text()
    found = [re.search(r"^kind: (\w+)$", doc, re.MULTILINE) for doc in documents(path)]
    assert [match.group(1) for match in found if match] == kinds
    assert all(re.search(r"^apiVersion: \S+$", doc, re.MULTILINE) for doc in documents(path))


def test_kustomization_lists_the_reconciled_manifests() -> None:
    listed = re.findall(r"^  - (\S+\.yaml)$", (BASE / "kustomization.yaml").read_text(), re.M)
    expected = {name.removeprefix("base/") for name in KINDS if name.startswith("base/")}
    assert set(listed) == expected - {"kustomization.yaml"}


def test_probes_and_scrape_path_exist_in_the_service() -> None:
    deployment = (BASE / "deployment.yaml").read_text()
    source = service_source()
    paths = set(re.findall(r"^\s+path: (/\S+)$", deployment, re.MULTILINE))
    assert paths == {"/v2/health/live", "/v2/health/ready"}
    assert re.search(r"readinessProbe:\s+httpGet:\s+path: /v2/health/ready", deployment)
    assert re.search(r"livenessProbe:\s+httpGet:\s+path: /v2/health/live", deployment)
    assert "prometheus.io/path: /metrics" in deployment
    for path in [*paths, "/metrics"]:
        assert f'"{path}"' in source, path
    assert "readOnly: true" in deployment
    assert "enableServiceLinks: false" in deployment
    assert "preStop:" in deployment
    assert "terminationGracePeriodSeconds:" in deployment


def test_calibration_jobs() -> None:
    cronjob = (BASE / "calibration-cronjob.yaml").read_text()
    assert "concurrencyPolicy: Forbid" in cronjob
    assert re.search(r"^\s+backoffLimit: \d+$", cronjob, re.MULTILINE)
    assert "- --quiet" in cronjob
    assert "- --json" in cronjob
    sharded = (K8S / "calibration-sharded-job.yaml").read_text()
    assert "completionMode: Indexed" in sharded
    assert "--shard=$(JOB_COMPLETION_INDEX)" in sharded
    completions = re.search(r"completions: (\d+)", sharded)
    assert completions is not None
    assert f"--num-shards={completions.group(1)}" in sharded


def test_cli_flags_exist() -> None:
    from marginwatch.calibration.__main__ import build_parser  # imports no torch

    usage = build_parser().format_usage()
    for name in ("base/calibration-cronjob.yaml", "calibration-sharded-job.yaml"):
        flags = re.findall(r"^\s+- (--[a-z-]+)", (K8S / name).read_text(), re.MULTILINE)
        assert flags
        for flag in flags:
            assert re.search(rf"\[{re.escape(flag)}[ \]]", usage), flag


def test_every_setting_variable_is_a_field() -> None:
    fields = set(Settings.model_fields)
    assert {"store", "port", "shutdown_timeout_s"} <= fields
    texts = [
        (BASE / "configmap.yaml").read_text(),
        (K8S / "overlays" / "gpu" / "configmap.yaml").read_text(),
        (COMPOSE / "docker-compose.yml").read_text(),
        (ROOT / "Dockerfile").read_text(),
    ]
    variables = set(re.findall(r"\bMARGINWATCH_([A-Z0-9_]+)", "\n".join(texts)))
    assert "STORE" in variables
    assert {variable.lower() for variable in variables} <= fields


def test_dockerfile_targets() -> None:
    dockerfile = re.sub(r"^#.*\n", "", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    stages = re.findall(r"^FROM \S+ AS ([\w-]+)$", dockerfile, re.MULTILINE)
    assert {"serve", "serve-gpu", "calibrate"} <= set(stages)
    assert stages[-1] == "serve"  # a plain `docker build .` builds the CPU serving image
    serve = dockerfile.split("AS serve\n", 1)[1]
    build = dockerfile.split("AS build-cpu\n", 1)[1].split("\nFROM ", 1)[0]
    assert "torch" not in serve + build
    # Locked packages first, then the project alone (the locks: test_dockerfile.py).
    assert build.index("-r serve.lock.txt") < build.index("pip install --no-deps")
    calibrate = dockerfile.split("AS calibrate\n", 1)[1].split("\nFROM ", 1)[0]
    assert calibrate.index("-r calibrate.lock.txt") < calibrate.index("pip install --no-deps")
    assert dockerfile.count("/v2/health/live") == 2
    assert 'CMD ["marginwatch-serve", "--host", "0.0.0.0", "--port", "8000"]' in serve
    scripts = (ROOT / "pyproject.toml").read_text()
    assert "marginwatch-serve =" in scripts
    assert "marginwatch-calibrate =" in scripts


def test_compose_mounts_what_exists() -> None:
    compose = (COMPOSE / "docker-compose.yml").read_text()
    for source in re.findall(r"^\s+- (\.{1,2}/[^:]+):", compose, re.MULTILINE):
        if source != "../../artifacts":  # the store ships with the repository (or is built)
            assert (COMPOSE / source).exists(), source
    assert "target: serve" in compose


def test_calibration_flagged_ratio_follows_the_served_version() -> None:
    """The brittle-fraction alert's baseline: set from each deployed version's record, and
    gone when a version states none (or the model is forgotten), never left from the last."""
    metrics = ServiceMetrics(live_window_predictions=10)
    record = read_record(current_dir(default_store(), "fmnist-cnn-pgd"))
    assert record.threshold_rule.name == "match-fraction"

    def gauge() -> float | None:
        return metrics.registry.get_sample_value(
            "marginwatch_calibration_flagged_ratio", {"model": "m"}
        )

    metrics.observe_version("m", record)
    assert gauge() == pytest.approx(1 - record.subset_robust_accuracy)
    target_tpr = ThresholdRuleSpec(name="target-tpr", target_tpr=0.9)
    metrics.observe_version("m", record.model_copy(update={"threshold_rule": target_tpr}))
    assert gauge() is None
    metrics.observe_version("m", record)
    metrics.forget("m")
    assert gauge() is None
