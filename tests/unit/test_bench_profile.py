"""bench/profile.py: py-spy's raw stacks sorted into the stages of the per-order breakdown."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage.bench.profile import OUTSIDE, UNSAMPLED, breakdown, breakdown_of_file, stage_of

LOOP = "<module> (consumer/worker.py:300);run (consumer/loop.py:229)"
PROCESS = f"{LOOP};_process (consumer/loop.py:280);handle (consumer/scorer.py:250)"


def test_a_sample_goes_to_its_leaf_most_claimed_frame() -> None:
    assert stage_of(f"{PROCESS};process (scoring/core.py:214);_decode (scoring/core.py:290);"
                    "decode (schemas/codec.py:210);decode_Order (<avro codec Order>:3)"
                    .split(";")) == "decode"
    assert stage_of(f"{PROCESS};encode (schemas/codec.py:185)".split(";")) == "encode"
    assert stage_of(f"{PROCESS};encode_columns (schemas/codec.py:230);encode_columns (<avro "
                    "columns encoder Prediction>:40)".split(";")) == "encode"
    assert stage_of(f"{PROCESS};encode_columns (schemas/codec.py:230);encode_columns (<avro "
                    "columns encoder Prediction>:12);_matrix_rows (schemas/compiled.py:160)"
                    .split(";")) == "encode"
    assert stage_of(f"{PROCESS};decode (schemas/codec.py:210);decode (<avro codec Order>:3);"
                    "_read_long (schemas/compiled.py:200)".split(";")) == "decode"
    # A comprehension's frame (its own on Python 3.11) is its function's.
    assert stage_of(f"{PROCESS};process (scoring/core.py:230);_records (scoring/core.py:470);"
                    "avro_columns (model/features.py:189);<dictcomp> (model/features.py:189)"
                    .split(";")) == "record building"
    assert stage_of(f"{PROCESS};process (scoring/core.py:230);<listcomp> (scoring/core.py:261)"
                    .split(";")) == "scoring (the core's own lines)"
    assert stage_of(f"{PROCESS};process (scoring/core.py:230);_records (scoring/core.py:470);"
                    "sampled_indices (scoring/sampling.py:20)".split(";")) == "sampling"
    assert stage_of(f"{PROCESS};process (scoring/core.py:230);_records (scoring/core.py:440)"
                    .split(";")) == "record building"
    assert stage_of(f"{PROCESS};process (scoring/core.py:230);inc (prometheus_client/"
                    "metrics.py:300)".split(";")) == "metrics"
    assert stage_of(LOOP.split(";")) == "consume"  # the loop's line calling consume()
    assert stage_of(f"{PROCESS};somewhere (else.py:1)".split(";")) == "hand-over (scorer.handle)"
    assert stage_of(f"{LOOP};somewhere (else.py:1)".split(";")) == "consume"


def test_samples_outside_the_batch_loop_are_counted_apart() -> None:
    assert stage_of(["<module> (consumer/worker.py:30)", "load (model/artifact.py:330)"]
                    ) == OUTSIDE
    assert stage_of([]) == OUTSIDE


def test_per_order_figures_are_sampled_seconds_over_orders() -> None:
    # 250 samples at 250 Hz: 1 s; 500 more outside the loop; 2,000 orders.
    lines = [f"{PROCESS};encode (schemas/codec.py:185) 150\n",
             f"{PROCESS};decode (schemas/codec.py:210) 100\n",
             "<module> (consumer/worker.py:30);load (model/artifact.py:330) 500\n",
             " 3\n", "\n"]
    figures = breakdown(lines, orders=2000, measured_cpu_s=1.5, rate_hz=250)
    assert figures.samples == 753
    assert figures.seconds[OUTSIDE] == pytest.approx(503 / 250)
    assert figures.per_order_us["encode"] == pytest.approx(0.6 / 2000 * 1e6)
    assert figures.per_order_us["decode"] == pytest.approx(0.4 / 2000 * 1e6)
    assert figures.per_order_us[UNSAMPLED] == pytest.approx(0.5 / 2000 * 1e6)
    assert OUTSIDE not in figures.per_order_us


def test_a_record_torn_over_lines_is_joined_up_to_its_count() -> None:
    """py-spy --nonblocking can read a frame's name while the process changes it (seen: a
    module docstring of several lines in place of a function name)."""
    lines = [f"{PROCESS};The model artifact.\n", "\n", "More of the docstring.;encode "
             "(schemas/codec.py:185) 7\n", f"{PROCESS};decode (schemas/codec.py:210) 3\n"]
    figures = breakdown(lines, orders=1, rate_hz=1)
    assert figures.samples == 10
    assert figures.seconds == {"encode": 7, "decode": 3}


def test_text_that_is_not_py_spy_raw_output_is_refused() -> None:
    with pytest.raises(ValueError, match="not py-spy raw output"):
        breakdown(["run (consumer/loop.py:229) many\n"], orders=1)


def test_a_frame_name_read_torn_into_bytes_that_are_not_utf8_keeps_every_count(
        tmp_path: Path) -> None:
    """A bench run's py-spy file held 0xf9 in a torn frame name: reading it as UTF-8 failed the
    whole run with UnicodeDecodeError."""
    raw = tmp_path / "profile.txt"
    raw.write_bytes(f"{PROCESS};".encode() + b"\xf9\x80garbled\n\xff;"
                    + b"encode (schemas/codec.py:185) 7\n"
                    + f"{PROCESS};decode (schemas/codec.py:210) 3\n".encode())
    figures = breakdown_of_file(raw, orders=1, rate_hz=1)
    assert figures.samples == 10
    assert figures.seconds == {"encode": 7, "decode": 3}


def test_a_profiled_run_without_samples_is_run_again(tmp_path: Path) -> None:
    """py-spy keeps only the samples of threads it does not judge idle: a short run on a
    loaded machine once ended with an empty file (py-spy attached), and the whole bench with
    it. The profiled run goes again; the figures are the run's with samples."""
    from triage.bench.runner import Bench, BenchError, Published, RunFigures

    said: list[str] = []
    runs: list[Path] = []
    line = "<module> (w.py:1);run (consumer/loop.py:229);encode (schemas/codec.py:185) 9\n"

    def run_config(config: str, main: Published, models: object, profile_to: Path
                   ) -> RunFigures:
        runs.append(profile_to)
        profile_to.write_text(line if len(runs) == 2 else "")  # the first one: no samples
        return RunFigures(config, 1, main.orders, 1.0, 0.5, 100.0, None)

    bench = object.__new__(Bench)
    bench.logs, bench.say = tmp_path, said.append
    bench._run_config = run_config  # type: ignore[method-assign]
    main = Published("orders", "t", 100, {0: 100}, 1.0)
    figures = bench._profile(main, (tmp_path, tmp_path))
    assert len(runs) == 2 and figures["samples"] == 9
    assert any("no samples" in s for s in said)
    runs.clear()
    bench._run_config = lambda *a, **k: (runs.append(k["profile_to"]),  # type: ignore
                                         k["profile_to"].write_text(""),
                                         RunFigures("b", 1, 100, 1.0, 0.5, 100.0, None))[2]
    with pytest.raises(BenchError, match="py-spy wrote no samples"):
        bench._profile(main, (tmp_path, tmp_path))
    assert len(runs) == 3
