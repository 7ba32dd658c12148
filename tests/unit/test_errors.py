"""One error root: every error class of the package derives from TriageError, and processes
decide their exit status by class, never by a list of names or a bare ``except ValueError``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from confluent_kafka import KafkaError, KafkaException

import triage
from triage import cli
from triage.bus.errors import (
    EXIT_CONFIGURATION,
    EXIT_INFRASTRUCTURE,
    BadRecord,
    ConfigurationError,
    InfrastructureError,
    TriageError,
    exit_status,
)
from triage.bus.settings import SettingsError


def _modules() -> list[str]:
    names = [triage.__name__]
    for sub in ("bus", "schemas", "model", "producer", "consumer", "bench"):
        package = importlib.import_module(f"triage.{sub}")
        names.append(package.__name__)
        names += [m.name for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")]
    names += [m.name for m in pkgutil.iter_modules(triage.__path__, "triage.")
              if m.name.count(".") == 1 and not m.ispkg]
    return names


def test_every_error_class_of_the_package_has_the_one_root() -> None:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__ \
                    and cls is not TriageError:
                found.append(cls)
                assert issubclass(cls, TriageError), f"{name}.{cls.__name__}"
                assert issubclass(cls, ConfigurationError | InfrastructureError | BadRecord), \
                    f"{name}.{cls.__name__} is none of the three kinds"
    assert len(found) >= 12  # the classes that had no common parent before


def test_the_exit_status_comes_from_the_class() -> None:
    assert exit_status(SettingsError("x")) == EXIT_CONFIGURATION == 2
    assert exit_status(InfrastructureError("x")) == EXIT_INFRASTRUCTURE == 1
    assert exit_status(KafkaException(KafkaError(KafkaError._TRANSPORT))) == 1
    assert exit_status(ValueError("a bug")) == 1  # not a usage error


@pytest.mark.parametrize(("error", "status", "says"), [
    (SettingsError("TRIAGE_X is wrong"), 2, "error: TRIAGE_X is wrong"),
    (InfrastructureError("the broker refused"), 1, "error: the broker refused"),
    (ValueError("oops"), 1, "unexpected ValueError: oops (a bug in triage"),
])
def test_a_command_ends_in_one_line_and_its_status_whatever_it_raises(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        error: Exception, status: int, says: str) -> None:
    def command(*_: object) -> int:
        raise error

    monkeypatch.setitem(cli.COMMANDS, "settings", command)
    assert cli.main(["settings"]) == status
    err = capsys.readouterr().err
    assert says in err
    assert err.count("Traceback") == (1 if status == 1 and not isinstance(
        error, TriageError) else 0)  # a bug's traceback is logged, as one log event
