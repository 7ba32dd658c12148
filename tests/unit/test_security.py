"""TLS/SASL settings reach every client; secrets come from the environment or files and never
appear in logs.

This half needs no broker and starts no process; tests/integration/test_security.py has the
rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SECRET
from triage.bus.clients import consumer_config, producer_config
from triage.bus.settings import SettingsError
from triage.settings import Settings


def test_sasl_and_tls_settings_reach_producers_and_consumers(tmp_path: Path) -> None:
    (tmp_path / "password").write_text(SECRET + "\n")
    settings = Settings.from_env({
        "TRIAGE_BOOTSTRAP_SERVERS": "broker:9093",
        "TRIAGE_SECURITY_PROTOCOL": "SASL_SSL",
        "TRIAGE_SASL_MECHANISM": "SCRAM-SHA-512",
        "TRIAGE_SASL_USERNAME": "scorer",
        "TRIAGE_SASL_PASSWORD_FILE": str(tmp_path / "password"),
        "TRIAGE_SSL_CA_LOCATION": "/etc/ca.pem",
    })
    for config in (producer_config(settings.connection), consumer_config(settings.connection,
                                                                         settings.scorer.group_id)):
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.mechanism"] == "SCRAM-SHA-512"
        assert config["sasl.username"] == "scorer"
        assert config["sasl.password"] == SECRET  # read from the file, newline stripped
        assert config["ssl.ca.location"] == "/etc/ca.pem"
        assert "ssl.key.location" not in config  # unset stays librdkafka's default
    assert SECRET not in repr(settings) and SECRET not in str(settings)


@pytest.mark.parametrize(("env", "message"), [
    ({"TRIAGE_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "TRIAGE_SASL_MECHANISM": "PLAIN",
      "TRIAGE_SASL_USERNAME": "u"}, "needs TRIAGE_SASL_USERNAME and TRIAGE_SASL_PASSWORD"),
    ({"TRIAGE_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "TRIAGE_SASL_MECHANISM": "GSSAPI",
      "TRIAGE_SASL_USERNAME": "u", "TRIAGE_SASL_PASSWORD": "p"}, "TRIAGE_SASL_MECHANISM"),
    ({"TRIAGE_SECURITY_PROTOCOL": "TLS"}, "TRIAGE_SECURITY_PROTOCOL"),
    ({"TRIAGE_SASL_PASSWORD_FILE": "/nonexistent/password"}, "cannot be read"),
])
def test_incomplete_security_settings_are_refused_clearly(env: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
