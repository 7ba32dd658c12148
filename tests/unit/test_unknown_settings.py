"""A TRIAGE_* variable that names no setting is reported with the closest one (found by a new
user: TRIAGE_BACH_SIZE=100 was ignored without a word); the command line's warning is in
tests/integration/test_cli.py."""

from __future__ import annotations

from triage.settings import unknown_variables


def test_a_misspelt_setting_is_named_with_the_closest_one() -> None:
    environ = {"TRIAGE_BACH_SIZE": "100", "TRIAGE_ZZZ": "1", "TRIAGE_BATCH_SIZE": "5",
               "TRIAGE_SASL_PASSWORD_FILE": "/run/secrets/p", "TRIAGE_KAFKA_CACHE": "/c",
               "TRIAGE_TEST_RUN": "x", "HOME": "/root"}
    assert unknown_variables(environ) == [("TRIAGE_BACH_SIZE", "TRIAGE_BATCH_SIZE"),
                                          ("TRIAGE_ZZZ", None)]

