"""The command line's settings: every section of every component (bus/settings.py says how
sections and aggregates work). :class:`Settings` inherits from each component's aggregate
(WorkerSettings, GatewaySettings, ProducerSettings), so whatever a command wires together is
given the one object read from the environment and the flags."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from triage.bus.settings import SettingsError, section
from triage.consumer.settings import WorkerSettings
from triage.gateway.settings import GatewaySettings
from triage.model.settings import MlflowSettings
from triage.model.streams import REFERENCE_STREAMS, ReferenceStream, stream_settings
from triage.producer.settings import ProducerSettings


@dataclass(frozen=True)
class Settings(WorkerSettings, GatewaySettings, ProducerSettings):
    """Every setting: the worker's, the gateway's, the producer's and MLflow's."""

    mlflow: MlflowSettings = section(MlflowSettings)

    def check(self) -> None:
        super().check()
        declared = {s.name for s in REFERENCE_STREAMS}
        unknown = sorted(set(dict(self.topics.stream_topics)) - declared)
        if unknown:  # a misspelt variable would otherwise quietly leave the default topic
            raise SettingsError(
                f"{', '.join(f'TRIAGE_{name.upper()}_TOPIC' for name in unknown)} names no "
                f"reference stream; the streams are {', '.join(sorted(declared))} "
                "(model/streams.py)")


def settings_rows(streams: tuple[ReferenceStream, ...] = REFERENCE_STREAMS
                  ) -> list[tuple[str, str, str]]:
    """Every setting as (variable, default, description): :class:`Settings`' table with the
    reference streams' topic settings (model/streams.py ``stream_settings``) after
    TRIAGE_REPLICATION_FACTOR, the other topic settings' neighbour. For docs/configuration.md
    and `triage settings`."""
    rows = Settings.settings_table()
    at = next((i + 1 for i, row in enumerate(rows) if row[0] == "TRIAGE_REPLICATION_FACTOR"),
              len(rows))
    return rows[:at] + stream_settings(streams) + rows[at:]


# TRIAGE_* variables that are no setting of Settings and still mean something: the Apache
# Kafka jar cache (bus/apache_kafka.py), and the test harness's own (TRIAGE_TEST_*).
OTHER_VARIABLES = frozenset({"TRIAGE_KAFKA_CACHE"})


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``TRIAGE_*`` variables of ``environ`` that name no setting (a typo is otherwise
    ignored without a word: ``TRIAGE_BACH_SIZE=100`` left the batch size at its default), each
    with the closest setting's name, or None. A secret's ``<VAR>_FILE`` is a setting too."""
    known = {row[0] for row in settings_rows()}
    known |= {name + "_FILE" for name in known} | OTHER_VARIABLES
    suffixes = {name.removeprefix("TRIAGE_"): name for name in known}

    def closest(name: str) -> str | None:
        found = difflib.get_close_matches(name.removeprefix("TRIAGE_"), sorted(suffixes), n=1,
                                          cutoff=0.75)
        return suffixes[found[0]] if found else None

    return [(name, closest(name)) for name in sorted(environ)
            if name.startswith("TRIAGE_") and name not in known
            and not name.startswith("TRIAGE_TEST_")]
