"""Checks of deploy/: the Kubernetes manifests against the Kubernetes API schema
(kubernetes-validate) and against the settings they name, the Prometheus rules with promtool,
and the metric names in the rules and the Grafana dashboard against what the code exports.

Nothing here starts a cluster: the manifests are checked as the API server would admit them,
the rules as Prometheus would load and evaluate them (``promtool test rules`` runs every alert
on series of its own, deploy/prometheus/alerts.test.yml).

This half needs a broker or starts processes; tests/unit/test_deploy.py has the rest."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import triage.consumer.metrics  # noqa: F401 - registers the worker's metrics in REGISTRY
from tests.helpers import PROMETHEUS

# -- Prometheus and Grafana --------------------------------------------------------------------

def promtool() -> str:
    """The promtool binary; skips, saying why, where it could not be installed (Makefile)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed: `make test` installs Debian's prometheus "
                    "package where apt-get can (as root); elsewhere install promtool")
    return found


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    tool = promtool()
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"],
                 ["check", "config", "prometheus-compose.yml"]):
        result = subprocess.run([tool, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}" \
                                       f"{result.stderr}"
