"""Ctrl-C in a long command stops cleanly with a summary, and a command that publishes nothing
because every row was refused says so and exits non-zero: real processes, a real broker.

Found by a new user: Ctrl-C during ``triage replay`` printed ``SystemError: <method 'poll' of
'cimpl.Producer' objects> returned NULL without setting an exception`` in 3 of 10 tries and in
the other 7 exited 130 without a word of how much was sent; a replay of a file whose every row
was refused exited 0 having published nothing.

This half needs no broker and starts no process; tests/integration/test_interrupt.py has the
rest.
"""

from __future__ import annotations

import pytest

from tests.helpers import prediction


def test_a_ctrl_c_inside_a_librdkafka_call_is_an_interruption_not_a_bug(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """What the 3 of 10 replays printed: SystemError, its context the KeyboardInterrupt."""
    from triage import cli

    def interrupted_in_c(*_: object) -> int:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemError("<method 'poll' of 'cimpl.Producer' objects> returned NULL "
                              "without setting an exception") from None

    monkeypatch.setitem(cli.COMMANDS, "settings", interrupted_in_c)
    assert cli.main(["settings"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: triage settings stopped" in err and "a bug" not in err


def test_the_printed_resume_keeps_what_was_left_of_the_limit() -> None:
    from triage.cli import resumed_command

    argv = ["/x/.venv/bin/triage", "replay", "my data/o.csv", "--limit", "1000", "--skip=5",
            "--rate", "50"]
    assert resumed_command(argv, 305, 700) == \
        "/x/.venv/bin/triage replay 'my data/o.csv' --rate 50 --skip 305 --limit 700"
    assert resumed_command(["triage", "replay", "d"], 12) == "triage replay d --skip 12"


def test_the_summary_tells_a_correction_from_an_order_scored_again() -> None:
    """A new user saw '10,000 corrected' after replaying the same file twice: every one was
    the same order_id published again, no decision changed."""
    from triage.cli import predictions_summary

    text = predictions_summary(3, [
        prediction("A", "Deliver", revision=2, reason="order_again"),
        prediction("B", "Deliver", revision=3, reason="late_reference:inventory,payments"),
        prediction("C", "Decline")], None)
    assert "1 corrected after late reference events" in text
    assert "1 scored again (the same order_id published again" in text
