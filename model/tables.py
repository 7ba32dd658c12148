"""Text tables for people: the confusion matrices that ``triage train``, ``triage demo`` and
``triage models compare`` print."""

from __future__ import annotations

from collections.abc import Sequence

GAP = 2  # spaces between columns


def confusion_text(corner: str, classes: Sequence[str], counts: Sequence[Sequence[int]]) -> str:
    """A confusion matrix as aligned text: a header line (``corner`` then every class name),
    then one line per class (its name, then its row of ``counts``), every name printed whole
    and every count right-aligned under the end of its column's name.

    ``counts``: ``len(classes)`` rows of ``len(classes)`` counts each (row: the first label,
    e.g. the policy's; column: the second, e.g. the model's). Raises ValueError when the shape
    does not match ``classes``.
    """
    if len(counts) != len(classes) or any(len(row) != len(classes) for row in counts):
        raise ValueError(f"a confusion matrix of {len(classes)} classes needs "
                         f"{len(classes)} x {len(classes)} counts")
    label_width = max([len(corner), *(len(c) for c in classes)]) + GAP
    widths = [max([len(name), *(len(str(row[j])) for row in counts)]) + GAP
              for j, name in enumerate(classes)]
    lines = [corner.ljust(label_width)
             + "".join(name.rjust(width) for name, width in zip(classes, widths, strict=True))]
    for name, row in zip(classes, counts, strict=True):
        lines.append(name.ljust(label_width)
                     + "".join(str(n).rjust(width) for n, width in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)
