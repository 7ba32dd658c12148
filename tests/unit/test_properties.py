"""Property-based tests of what the loop does with each record before scoring: decode, validate,
then compute features and predict. Whatever the bytes or the field values, each step either
succeeds or raises the one error the loop turns into a dead letter; nothing else escapes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triage.model import artifact
from triage.model.orders import OrderColumns
from triage.model.reference import ReferenceTables
from triage.schemas.codec import Codec, DecodeError
from triage.scoring.validation import OrderValidator
from triage.settings import Settings

EXAMPLES = settings(max_examples=5_000, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
CODEC = Codec("order")
HEADER = CODEC.encode({"order_id": "o", "customer_id": "c", "timestamp_ms": 0, "sku_code": "s",
                       "zip_code": "z"})[:10]
DECODE_KINDS = {"tombstone", "unknown_framing", "unknown_schema", "invalid_avro",
                "trailing_bytes", "no_registry", "registry_error"}
REJECT_REASONS = {"missing_field", "invalid_field", "invalid_timestamp"}
VALIDATOR = OrderValidator(Settings().validation)


@EXAMPLES
@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=120).map(lambda body: HEADER + body),   # right fingerprint
                 st.binary(max_size=120).map(lambda body: b"\x00" + body)))  # registry framing
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        record = CODEC.decode(data)
    except DecodeError as exc:
        assert exc.reason in DECODE_KINDS
        return
    assert set(record) == {"order_id", "customer_id", "timestamp_ms", "sku_code", "zip_code"}
    VALIDATOR.problem(record, int(time.time() * 1000))  # must not raise either


@pytest.fixture(scope="module")
def scoring(history: Path, model_dir: Path) -> tuple[artifact.Model, ReferenceTables]:
    return artifact.load(model_dir), ReferenceTables.load(history)


ANY_TEXT = st.text(max_size=300)
ORDERS = st.fixed_dictionaries({
    "order_id": ANY_TEXT, "customer_id": ANY_TEXT, "sku_code": ANY_TEXT, "zip_code": ANY_TEXT,
    "timestamp_ms": st.one_of(st.integers(-2**63, 2**63 - 1),
                              st.integers(946_684_800_000, 2_000_000_000_000)),
})


@EXAMPLES
@given(order=ORDERS)
def test_arbitrary_field_values_are_rejected_with_a_reason_or_scored(
        order: dict, scoring: tuple[artifact.Model, ReferenceTables]) -> None:
    model, reference = scoring
    record = CODEC.decode(CODEC.encode(order))  # any such record is valid Avro
    problem = VALIDATOR.problem(record, int(time.time() * 1000))
    if problem is not None:
        assert problem[0] in REJECT_REASONS and problem[1]
        return
    assert all(record[f].isprintable() and record[f].strip() == record[f] and record[f]
               for f in ("order_id", "customer_id", "sku_code", "zip_code"))
    features = OrderColumns.from_records([record]).features(reference)
    recommendation, proba = model.predict(features)
    assert recommendation[0] in model.classes
    assert np.isfinite(proba).all()
