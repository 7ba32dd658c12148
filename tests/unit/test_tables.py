"""The confusion matrices printed for people (triage train, triage demo, triage models compare):
every class name whole (the demo printed ``HoldCheckAvail``), every count under its class."""

from __future__ import annotations

import re

import pytest

from triage.model.policy import CLASSES
from triage.model.tables import confusion_text
from triage.model.train import TrainReport

# Counts of every width, a seven-digit one included (wider than any column used to be).
COUNTS = [[1_234_567, 0, 3, 0, 12], [0, 42, 0, 0, 0], [5, 0, 987, 0, 0],
          [0, 0, 0, 7, 0], [0, 1, 0, 0, 100_000]]


def cells(line: str) -> list[tuple[str, int]]:
    """The line's words with the column where each ends."""
    return [(m.group(), m.end()) for m in re.finditer(r"\S+", line)]


def assert_whole_and_aligned(text: str, corner: str) -> None:
    header, *rows = text.splitlines()
    assert header.startswith(corner)
    names = cells(header)[-len(CLASSES):]
    assert [name for name, _ in names] == list(CLASSES)  # every name whole, in order
    assert len(rows) == len(CLASSES)
    for name, row, line in zip(CLASSES, COUNTS, rows, strict=True):
        words = cells(line)
        assert words[0][0] == name
        assert [int(word) for word, _ in words[1:]] == row
        # Each count ends where its column's name ends: it reads under the right class.
        assert [end for _, end in words[1:]] == [end for _, end in names]


def test_the_training_report_prints_every_class_name_whole() -> None:
    """What triage train and triage demo print."""
    report = TrainReport(None, None, 1.0, COUNTS, CLASSES, rows=10, synthetic_rows=0)
    assert_whole_and_aligned(report.confusion_table(), "policy \\ model")


def test_confusion_text_takes_any_corner_and_refuses_a_wrong_shape() -> None:
    """What triage models compare prints (active \\ shadow)."""
    assert_whole_and_aligned(confusion_text("active \\ shadow", CLASSES, COUNTS),
                             "active \\ shadow")
    with pytest.raises(ValueError, match="5 x 5"):
        confusion_text("a \\ b", CLASSES, COUNTS[:4])
