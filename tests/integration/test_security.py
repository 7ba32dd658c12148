"""TLS/SASL settings reach every client; secrets come from the environment or files and never
appear in logs.

This half needs a broker or starts processes; tests/unit/test_security.py has the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import SECRET


def test_a_worker_never_logs_its_password(bootstrap: str, tmp_path: Path, history: Path,
                                          model_dir: Path) -> None:
    """A scorer configured for SASL against a broker that does not speak it: it starts, its
    clients fail to authenticate, it logs at debug level and says no broker answered, and the
    password is nowhere."""
    (tmp_path / "password").write_text(SECRET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({
        "TRIAGE_BOOTSTRAP_SERVERS": bootstrap, "TRIAGE_STATE_DIR": str(tmp_path),
        "TRIAGE_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "TRIAGE_SASL_MECHANISM": "PLAIN",
        "TRIAGE_SASL_USERNAME": "scorer", "TRIAGE_SASL_PASSWORD_FILE": str(tmp_path / "password"),
        "TRIAGE_LOG_LEVEL": "debug", "TRIAGE_LOG_FORMAT": "json",
    })
    worker = subprocess.Popen(
        [sys.executable, "-m", "triage.cli", "consume", "--workers", "1", "--model",
         str(model_dir), "--reference", str(history)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    assert worker.stdout is not None
    for line in worker.stdout:  # its clients have tried by then (the brokers' metadata)
        output.append(line)
        if "worker_failed" in line:
            break
    worker.send_signal(signal.SIGTERM)
    rest, _ = worker.communicate(timeout=90)
    output.append(rest)
    text = "".join(output)
    assert "no Kafka broker answered" in text and "TRIAGE_SECURITY_PROTOCOL" in text
    assert '"facility": "FAIL"' in text  # the clients' own failures, logged
    assert SECRET not in text
