"""Where a scorer worker's time goes per order: py-spy samples of a worker under ``triage bench
--profile``, sorted into the stages of issue 26's breakdown.

The worker is sampled by ``py-spy record --pid`` (it reads the process's memory; no code runs
in the worker, and ``--nonblocking`` leaves it running while it reads) at ``RATE_HZ``, in
py-spy's raw format: one line per distinct stack, ``frame;frame;...;frame count`` from the
thread's root to its leaf, each frame ``function (file:line)``. py-spy keeps the samples of the
Python threads it does not judge idle, so under a saturating load a stage's samples are the
main thread's time in it. A sample is charged to the stage of the leaf-most frame that one of
:data:`STAGES` claims; samples outside the batch loop (start-up, loading, the reference
restore, shutdown) are counted apart. py-spy sees Python frames only: a call into C
(librdkafka, xgboost, NumPy) is charged to the Python line that made it, and librdkafka's own
threads are not seen at all; :func:`breakdown` gives the worker's measured CPU less the
sampled time as a figure of its own (:data:`UNSAMPLED`: those threads' CPU, less any time the
main thread spent waiting in a call that py-spy counted).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

RATE_HZ = 250  # samples per second; py-spy's default is 100

# (stage, file suffix, function names or None for any): the first that claims a frame, walking
# from the leaf towards the root, takes the sample. Order matters only between rules that can
# claim the same frame.
STAGES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("metrics", "prometheus_client/", None),
    ("sampling", "scoring/sampling.py", None),
    ("validation", "scoring/validation.py", None),
    ("record building", "model/features.py", frozenset({"records", "avro_columns",
                                                         "_as_is", "_nan_to_null"})),
    ("decode", "schemas/codec.py", frozenset({"decode", "_decode_single_object",
                                              "_decode_registry_framed"})),
    ("encode", "schemas/codec.py", frozenset({"encode", "encode_columns"})),
    # The generated functions' frames are "<avro ...>": their caller above claims them; the
    # helpers they call are the encoders' own.
    ("encode", "schemas/compiled.py", frozenset({"_matrix_rows", "column_rows", "_long",
                                                 "_float32"})),
    ("design matrix", "model/artifact.py", frozenset({"build", "design_matrix"})),
    ("predict", "model/artifact.py", None),
    ("predict", "xgboost/", None),
    ("features", "model/features.py", None),
    ("features", "model/asof.py", None),
    ("features", "model/reference.py", None),
    ("features", "model/orders.py", None),
    ("features", "scoring/feed.py", None),
    ("record building", "scoring/core.py", frozenset({"_records", "_take"})),
    ("scoring (the core's own lines)", "scoring/core.py", None),
    ("produce", "bus/clients.py", frozenset({"produce", "produce_batch"})),
    ("produce", "consumer/loop.py", frozenset({"_process"})),
    ("commit", "consumer/commit.py", None),
    ("consume", "bus/clients.py", frozenset({"records_of", "source_of"})),
    ("hand-over (scorer.handle)", "consumer/scorer.py", None),
    ("status and health", "consumer/loop.py", frozenset({"_write_status", "partition_lag",
                                                         "lag"})),
    ("status and health", "consumer/groupwatch.py", None),
    ("status and health", "bus/health.py", None),
    ("consume", "consumer/loop.py", frozenset({"run"})),
)
OUTSIDE = "outside the batch loop (start, restore, stop)"
UNSAMPLED = "measured CPU less the loop's samples (librdkafka, other threads)"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")
# One record: a stack (maybe empty, or with a frame name read torn across lines) and its count.
_RECORD = re.compile(r"^(?P<stack>.*) (?P<count>\d+)\n?$", re.DOTALL)
_LOOP = ("run", "consumer/loop.py")


@dataclass(frozen=True)
class Breakdown:
    """Sampled time by stage: ``seconds`` per stage over the whole profile (``OUTSIDE``
    included), ``per_order_us`` per stage inside the batch loop in µs per order, and
    ``UNSAMPLED`` when the worker's measured CPU is given (negative when the main thread
    waited more than the other threads worked)."""

    seconds: dict[str, float]
    per_order_us: dict[str, float]
    samples: int

    def as_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "rate_hz": RATE_HZ,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "per_order_us": {k: round(v, 2) for k, v in self.per_order_us.items()}}


_INNER = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>"})


def stage_of(frames: list[str]) -> str:
    """The stage of one stack (root first), or OUTSIDE if it is not under the batch loop. A
    comprehension's or lambda's frame (its own frame on Python 3.11) counts as the function
    that holds it: the next frame towards the root in the same file."""
    parsed = [_parse(frame) for frame in frames]
    if not any(function == _LOOP[0] and file.endswith(_LOOP[1]) for function, file in parsed):
        return OUTSIDE
    for i in range(1, len(parsed)):
        function, file = parsed[i]
        if function in _INNER and parsed[i - 1][1] == file:
            parsed[i] = (parsed[i - 1][0], file)
    for function, file in reversed(parsed):
        for stage, suffix, functions in STAGES:
            if ((suffix.endswith("/") and suffix in file) or file.endswith(suffix)) and (
                    functions is None or function in functions):
                return stage
    return "other"


def breakdown(lines: Iterable[str], orders: int, measured_cpu_s: float | None = None,
              rate_hz: float = RATE_HZ) -> Breakdown:
    """Sum py-spy raw ``lines`` by stage. ``orders``: how many the loop scored while sampled;
    ``measured_cpu_s``: the worker's CPU over the loop, from an unprofiled run of the same
    orders, so that what py-spy cannot see is a figure too. A record split over lines (a frame
    name that py-spy's ``--nonblocking`` read while the process changed it, seen as a module
    docstring) is joined up to its count. Raises ValueError if the text ends in something that
    is not a record."""
    counts: dict[str, int] = {}
    total = 0
    pending = ""  # a record split over lines: a frame name read torn (--nonblocking)
    for line in lines:
        pending += line
        record = _RECORD.match(pending)
        if record is None:
            continue
        pending = ""
        frames = [frame for frame in record["stack"].split(";") if _FRAME.match(frame)]
        stage = stage_of(frames)
        counts[stage] = counts.get(stage, 0) + int(record["count"])
        total += int(record["count"])
    if pending.strip():
        raise ValueError(f"not py-spy raw output: {pending[:120]!r}")
    seconds = {stage: n / rate_hz for stage, n in sorted(counts.items(), key=lambda kv: -kv[1])}
    inside = {stage: s for stage, s in seconds.items() if stage != OUTSIDE}
    per_order = {stage: s / orders * 1e6 for stage, s in inside.items()}
    if measured_cpu_s is not None:
        per_order[UNSAMPLED] = (measured_cpu_s - sum(inside.values())) / orders * 1e6
    return Breakdown(seconds, per_order, total)


def breakdown_of_file(raw: Path, orders: int, measured_cpu_s: float | None = None,
                      rate_hz: float = RATE_HZ) -> Breakdown:
    """:func:`breakdown` of the py-spy raw file ``raw``. A frame name read torn
    (``--nonblocking``) can hold any bytes, UTF-8 or not (seen: 0xf9 in a bench run): bytes that
    are not UTF-8 become U+FFFD in that frame name, which then claims no stage, and every count
    is kept. Raises OSError if the file cannot be read, ValueError as :func:`breakdown` does."""
    with open(raw, encoding="utf-8", errors="replace") as lines:
        return breakdown(lines, orders, measured_cpu_s, rate_hz)


def py_spy() -> str:
    """The py-spy executable beside this Python (the dev requirements pin it), else on PATH.
    Raises FileNotFoundError naming how to install it."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise FileNotFoundError("--profile needs py-spy: `make venv` installs it "
                                "(requirements-dev.txt), or pip install py-spy==0.4.1")
    return found


def record(pid: int, out: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start sampling process ``pid`` into ``out`` (raw format) until it exits."""
    return subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw",
         "--nonblocking", "--output", str(out)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _parse(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    assert match is not None  # filtered by breakdown()
    return match["function"], match["file"]
