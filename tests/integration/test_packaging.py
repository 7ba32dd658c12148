"""The package as pip installs it: one top-level import name, the contracts inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_one_top_level_name_with_every_package_and_contract(
        tmp_path: Path) -> None:
    """`pip install .` adds `triage` and nothing else to site-packages: the folders at the
    top of the repository install as triage.bus, triage.model, ... (pyproject's package-dir),
    so no `model` or `schemas` of this project shadows another's."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                            "--disable-pip-version-check", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("triage-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("triage-")} == {
        "triage"}
    for package in ("bus", "schemas", "model", "producer", "consumer", "bench"):
        assert f"triage/{package}/__init__.py" in names, package
    for contract in ("order", "prediction", "drift_sample", "drift_report", "inventory",
                     "payment", "zip_code", "history/prediction.1"):
        assert f"triage/schemas/{contract}.avsc" in names, contract
