"""``triage produce`` publishes any stream's event, from flags or JSON lines on stdin, with the
replay's validation and partitioner; found by a new user: a store trying one order by hand had
to write a one-row payments.csv and replay it, and grep 23k lines for its prediction."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from triage.settings import Settings

from .test_cli import TRIAGE, clean_env, triage


def test_refused_flags_name_the_flag_before_connecting(tmp_path: Path) -> None:
    env = clean_env(tmp_path, TRIAGE_BOOTSTRAP_SERVERS="127.0.0.1:9")
    missing = triage("produce", "payment", "--order-id", "O-1", env=env)
    assert missing.returncode == 2 and "payment needs --status" in missing.stderr
    foreign = triage("produce", "inventory", "--sku", "S", "--inventory", "3", "--zip", "1",
                     env=env)
    assert foreign.returncode == 2 and "inventory takes no --zip" in foreign.stderr
    bad_time = triage("produce", "zip_code", "--zip", "1", "--available-from", "soon", env=env)
    assert bad_time.returncode == 2 and "not in YYYY-MM-DD HH:MM:SS form" in bad_time.stderr
    assert "Traceback" not in missing.stderr + foreign.stderr + bad_time.stderr


def test_an_order_and_its_payment_by_hand_then_its_prediction_by_id(
        settings: Settings, model_dir: Path, history: Path, tmp_path: Path) -> None:
    """The flow of a person trying one order: a worker runs, a payment and its order are
    published with flags, the order's prediction is read by its id and was joined with that
    payment."""
    env = clean_env(tmp_path, **settings.to_env())
    worker = subprocess.Popen([*TRIAGE, "worker", "--model", str(model_dir), "--reference",
                               str(history)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        paid = triage("produce", "payment", "--order-id", "BY-HAND-1", "--status", "DECLINED",
                      "--timestamp", "2026-01-05 09:59:00", env=env)
        assert paid.returncode == 0, paid.stderr
        ordered = triage("produce", "--order-id", "BY-HAND-1", "--customer-id", "C-1",
                         "--sku", "SKU-1", "--zip", "10001", "--timestamp",
                         "2026-01-05 10:00:00", env=env)
        assert ordered.returncode == 0, ordered.stderr
        where = re.compile(r"published (\w+) BY-HAND-1 to \S+ partition (\d+) offset \d+")
        payment, order = where.search(paid.stdout), where.search(ordered.stdout)
        assert payment and order and payment[1] == "payment" and order[1] == "order"
        assert payment[2] == order[2]  # the Java partitioner: the payment on its order's
        deadline, found = time.monotonic() + 90, []
        while not found and time.monotonic() < deadline:
            read = triage("predictions", "--order-id", "BY-HAND-1", "--idle", "1", env=env)
            assert read.returncode == 0, read.stderr
            found = [json.loads(line) for line in read.stdout.splitlines()]
        assert len(found) == 1, worker.stderr.read() if worker.poll() is not None else found
        assert found[0]["features"]["payment_status"] == "DECLINED"
        assert "1 prediction of 1 order" in read.stderr
    finally:
        worker.terminate()
        worker.wait(30)


def test_json_lines_on_stdin_mix_streams_and_a_bad_line_is_refused_with_its_number(
        settings: Settings, tmp_path: Path) -> None:
    lines = [
        {"order_id": "J-1", "customer_id": "C", "sku_code": "S", "zip_code": "1",
         "timestamp": "2026-01-05 10:00:00"},
        {"stream": "payment", "order_id": "J-1", "timestamp": "2026-01-05 09:00:00",
         "payment_status": "OK"},
        {"stream": "inventory", "sku_code": "S", "timestamp": "2026-01-05 09:00:00",
         "inventory": 4},
        {"stream": "zip_code", "zip_code": "1", "available_from": "2025-01-01 00:00:00"},
        {"order_id": "J-2", "customer_id": "C", "sku_code": "S", "zip_code": "1",
         "timestamp": "tomorrow"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"
    env = clean_env(tmp_path, **settings.to_env())
    result = subprocess.run([*TRIAGE, "produce", "--stdin"], input=text, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "published 4, failed 0, refused 2" in result.stderr
    assert "line 5: timestamp 'tomorrow'" in result.stderr and "line 6: not JSON" in result.stderr
    published = [line.split()[1] for line in result.stdout.splitlines()]
    assert published == ["order", "payment", "inventory", "zip_code"]
    numeric = subprocess.run([*TRIAGE, "produce", "zip_code", "--stdin"],
                             input='{"zip_code": 1000, "available_from": "2025-01-01 00:00:00"}\n',
                             env=env, capture_output=True, text=True, timeout=60)
    assert numeric.returncode == 2 and "zip_code must be text" in numeric.stderr
    refused = subprocess.run([*TRIAGE, "produce", "payment", "--stdin"], input="{}\n",
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "nothing was published" in refused.stderr
