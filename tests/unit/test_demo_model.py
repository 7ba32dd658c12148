"""triage demo with a model already in place: used as it is, never overwritten, and a model
trained on other CSVs than --data's is named as such (found by a new user: `triage demo --data
exercise-2021` after `make demo` scored with the model of the generated orders, silently)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from triage.demo import _ensure_model
from triage.model import artifact

DATA = Path(__file__).parents[1] / "data" / "exercise-2021"


def _model_trained_on(model_dir: Path, data_dir: Path) -> None:
    model_dir.mkdir()
    digests = {name: artifact.sha256_of(data_dir / name) for name in
               ("orders.csv", "payments.csv", "inventory.csv", "zip_codes.csv")}
    (model_dir / artifact.MANIFEST).write_text(json.dumps({
        "format": artifact.FORMAT,
        "training": {"data_dir": str(data_dir), "data_sha256": digests}}))


def test_a_model_trained_on_other_data_is_used_and_named_as_such(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    shutil.copytree(DATA, other)
    with open(other / "orders.csv", "a", encoding="utf-8") as orders:
        orders.write("x-1,c-1,2021-01-01 00:00:00,s-1,z-1\n")
    _model_trained_on(tmp_path / "model", other)
    before = (tmp_path / "model" / artifact.MANIFEST).read_text()

    _ensure_model(tmp_path / "model", DATA, "utf-8")

    out = capsys.readouterr().out
    assert f"trained on {other}, not on {DATA}" in out and "--model DIR" in out
    assert (tmp_path / "model" / artifact.MANIFEST).read_text() == before  # not retrained


def test_a_model_trained_on_the_same_data_is_just_used(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model_trained_on(tmp_path / "model", DATA)
    _ensure_model(tmp_path / "model", DATA, "utf-8")
    assert capsys.readouterr().out == f"using the model in {tmp_path / 'model'}\n"
