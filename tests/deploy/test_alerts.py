"""The alerts do what they say: `promtool test rules` runs every file in
deploy/prometheus/tests/ (one per alert, each with a case where the alert fires and one where it
stays silent), the rules pass `promtool check rules`, and the Prometheus Operator's
PrometheusRule is exactly what make_rule.py generates from rules.yml.

That the series the unit tests feed are ones the service really exports is checked with the
dashboard's and the rules' queries, in test_manifests.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
GENERATED = (
    ROOT / "deploy" / "kubernetes" / "components" / "prometheus-operator" / "prometheusrule.yaml"
)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerts() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for group in load(RULES)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=[path.stem for path in UNIT_TESTS])
def test_promtool_unit_tests(promtool: str, unit_test: Path) -> None:
    # promtool reads rule_files relative to the test file; it exits 1 on any failed case.
    result = subprocess.run(
        [promtool, "test", "rules", unit_test.name],
        cwd=unit_test.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_one_unit_test_file_per_alert() -> None:
    """Every alert has its file; each file tests one alert, against the real rules.yml, with at
    least one case where it fires and one where it stays silent."""
    tested: dict[str, Path] = {}
    for path in UNIT_TESTS:
        suite = load(path)
        assert suite["rule_files"] == ["../rules.yml"], path.name
        cases = [case for test in suite["tests"] for case in test.get("alert_rule_test", [])]
        names = {case["alertname"] for case in cases}
        assert len(names) == 1, f"{path.name} tests {sorted(names)}: one alert per file"
        (name,) = names
        assert name not in tested, f"{name} is tested by {tested.get(name)} and {path.name}"
        tested[name] = path
        assert any(case["exp_alerts"] for case in cases), f"{path.name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in cases), f"{path.name}: none where silent"
    assert set(tested) == set(alerts())


def test_every_alert_has_severity_and_text() -> None:
    rules = alerts()
    assert rules  # the loop below checks something
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_prometheus_rule_is_generated_from_the_rules() -> None:
    result = subprocess.run(
        [sys.executable, str(PROMETHEUS / "make_rule.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rule = load(GENERATED)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == load(RULES)["groups"]


def test_make_rule_detects_a_stale_file(tmp_path: Path) -> None:
    """--check compares the whole text: a changed expression makes it fail."""
    sys.path.insert(0, str(PROMETHEUS))
    try:
        import make_rule
    finally:
        sys.path.remove(str(PROMETHEUS))
    text = RULES.read_text()
    assert make_rule.render(text) == GENERATED.read_text()
    changed = text.replace("> 0.01", "> 0.02", 1)
    assert changed != text
    assert make_rule.render(changed) != GENERATED.read_text()
    parsed = yaml.safe_load(make_rule.render(changed))
    assert parsed["spec"]["groups"] == yaml.safe_load(changed)["groups"]


def test_scrape_job_is_the_one_the_rules_expect() -> None:
    """The `up` alert matches job="marginwatch": the compose stack scrapes under that name,
    and the PodMonitor takes the job from a pod label whose value it is (test_kustomize.py)."""
    rules = RULES.read_text()
    assert 'up{job="marginwatch"}' in rules
    compose = load(ROOT / "deploy" / "compose" / "prometheus.yml")
    assert [job["job_name"] for job in compose["scrape_configs"]] == ["marginwatch"]
