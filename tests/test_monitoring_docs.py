"""docs/monitoring: the alerting rules and the Grafana dashboard parse, and every sidecar
metric they name is one the sidecar exports (a renamed metric must not leave a silent alert)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from sidecar.metrics import Metrics

DOCS = Path(__file__).resolve().parent.parent / "docs" / "monitoring"
NAME = re.compile(r"\bsidecar_[a-z_]+\b")


def exported() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        for suffix in ("", "_total", "_bucket", "_count", "_sum"):
            names.add(family.name + suffix)
    return names


def test_alert_rules_parse_and_name_exported_metrics() -> None:
    doc = yaml.safe_load((DOCS / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "AccountNearPlanLimit", "SidecarUnreachable", "ReconciliationReleasedCalls"}
    used = {n for r in rules for n in NAME.findall(r["expr"])}
    assert used and used <= exported(), used - exported()


def test_dashboard_parses_and_names_exported_metrics() -> None:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in NAME.findall(e)}
    assert {"sidecar_account_active_calls", "sidecar_limit_refusals_total"} <= used
    assert used <= exported(), used - exported()
