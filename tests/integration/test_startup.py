"""What each process imports (issue 14's fast start): the command line and `triage produce`
import no scoring stack, and a serving process runs without scikit-learn, SciPy's statistics
or pandas, scoring as the estimator would. No timings: those are `triage bench`'s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("numpy", "pandas", "xgboost", "sklearn", "scipy", "fastavro")


def imported(code: str, *args: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it leaves a dict in ``out``, printed as JSON with
    the heavy modules that were imported."""
    script = (f"import sys, json\nout = {{}}\n{code}\n"
              f"out['modules'] = sorted(m for m in {HEAVY!r} + ('scipy.stats',) "
              "if m in sys.modules)\nprint(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_command_line_imports_no_scoring_stack_to_parse_or_answer_help() -> None:
    found = imported("""
from triage.cli import build_parser, main
build_parser().parse_args(["produce", "--order-id", "o", "--customer-id", "c", "--sku", "s",
                           "--zip", "z"])
try:
    main(["--help"])
except SystemExit:
    pass
""")
    assert found["modules"] == [], found


def test_a_serving_process_scores_without_sklearn_scipy_stats_or_pandas(
        model_dir: Path) -> None:
    found = imported("""
from triage.model import artifact
artifact.import_xgboost_for_serving()
import triage.consumer.worker
from triage.settings import Settings
from triage.scoring.core import CoreConfig, Incoming, ScoringCore
from triage.scoring.validation import OrderValidator
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec
model = artifact.load(sys.argv[1])
codec = Codec("order")
order = {"order_id": "o-1", "customer_id": "c-1", "timestamp_ms": 1_700_000_000_000,
         "sku_code": "SKU-1", "zip_code": "10115"}
core = ScoringCore(model, ReferenceTables.empty(), codec, config=CoreConfig(),
                   checks=[OrderValidator(Settings().validation)])
outcome = core.process([Incoming(codec.encode(order))])
out["recommendation"] = outcome.predictions[0].record["recommendation"]
from triage.model.orders import OrderColumns
from triage.model.policy import label
out["policy"] = str(label(OrderColumns.from_records([order]).features(core.reference))[0])
out["serving"] = sorted(m for m in ("sklearn", "pandas", "scipy.stats") if m in sys.modules)
import sklearn  # still importable for a hook that wants it
""", str(model_dir))
    assert found["serving"] == [], found
    assert found["recommendation"] == found["policy"], found
