"""Generate the Prometheus Operator's PrometheusRule from rules.yml, the one source of the rules.

    python deploy/prometheus/make_rule.py          # rewrite the component's prometheusrule.yaml
    python deploy/prometheus/make_rule.py --check  # exit 1 if that file is out of date

The rules are copied as text, indented under `spec:`, so that their comments and folded
expressions stay as written (a YAML round trip would drop the comments and re-wrap every
expression). tests/deploy/test_alerts.py runs `--check` and compares the parsed groups. The
standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
TARGET = HERE.parent / "kubernetes" / "components" / "prometheus-operator" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/prometheus/make_rule.py: edit rules.yml
# and run `python deploy/prometheus/make_rule.py`; a test fails while the two disagree.
#
# A Prometheus managed by the operator loads this only if its ruleSelector matches the labels
# (kube-prometheus-stack's default wants `release: <its Helm release>`): add them with a
# kustomize `labels:` entry in the overlay that uses this component.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: marginwatch
  namespace: marginwatch
  labels:
    app.kubernetes.io/name: marginwatch
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule for `rules_text`: its lines from `groups:` on, indented by two."""
    lines = rules_text.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        raise SystemExit(f"{RULES}: no top-level `groups:` line") from None
    # The comment block above `groups:` describes rules.yml itself; the header replaces it.
    body = [f"  {line}" if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    wanted = render(RULES.read_text())
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != wanted:
            print(f"{TARGET} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
