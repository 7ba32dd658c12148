"""The integration tier: every test under tests/integration/ is marked ``integration`` here,
and gets its broker from one fixture, ``broker``, in this order (DESIGN.md, "Brokers"):
TRIAGE_BOOTSTRAP_SERVERS if set; else Kafka in testcontainers where a Docker engine answers;
else Apache Kafka's own jars from Maven Central, started by bus/apache_kafka.py where Java 17+ is
found (``make venv`` fetched them); else the embedded broker. Tests marked ``embedded`` (the demo
path, the embedded broker's own behaviour) run on an embedded broker whatever the others run on.
One broker per test process (pytest-xdist runs two), shared by its tests; each test isolates
itself with topics and a group of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    APACHE_KAFKA,
    CONFIGURED,
    EMBEDDED,
    LIVE_ORDERS,
    Broker,
    SettingsFactory,
    broker_notes,
    oracle,
)
from triage.bus.clients import create_topics
from triage.bus.embedded import EmbeddedBroker
from triage.model.datagen import generate
from triage.model.features import WINDOWED_NAMES
from triage.model.orders import read_orders_csv
from triage.model.streams import reference_topic_partitions
from triage.settings import Settings

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this tier ``integration`` (it needs a broker or starts processes)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _docker_running() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True




def _noted(broker: Broker) -> Broker:
    """Note the broker of this test process for the summary at the end of the run (written
    by the process that ran the tests, read by the one that prints)."""
    import json

    notes = broker_notes()
    notes.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (notes / f"{name}-{broker.kind.split()[0].lower()}.json").write_text(json.dumps(
        {"kind": broker.kind, "bootstrap": broker.bootstrap,
         "log": str(broker.log) if broker.log else None}))
    return broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The broker of the integration tests (module docstring)."""
    configured = os.environ.get("TRIAGE_BOOTSTRAP_SERVERS")
    if configured:
        yield _noted(Broker(configured, CONFIGURED))
        return
    if _docker_running():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield _noted(Broker(kafka.get_bootstrap_server(), APACHE_KAFKA))
        return
    from triage.bus.apache_kafka import ApacheKafka, unavailable_reason

    log = tmp_path_factory.mktemp("broker") / "kafka.log"
    reason = unavailable_reason()
    if reason is None:
        with ApacheKafka(log_path=log) as kafka:
            yield _noted(Broker(kafka.bootstrap, APACHE_KAFKA, log))
        return
    print(f"\nintegration tests on the embedded broker: {reason}")
    yield from _embedded(tmp_path_factory)


def _embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    log = tmp_path_factory.mktemp("embedded") / "tansu.log"
    with EmbeddedBroker(log_path=log) as embedded:
        yield _noted(Broker(embedded.bootstrap, EMBEDDED, log))


@pytest.fixture(scope="session")
def embedded_broker(broker: Broker, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[Broker]:
    """An embedded broker for the tests marked ``embedded``: the one of ``broker`` if that
    is embedded, else one of its own."""
    if broker.kind == EMBEDDED:
        yield broker
    else:
        yield from _embedded(tmp_path_factory)


@pytest.fixture(scope="session")
def bootstrap(broker: Broker) -> str:
    """The address of the integration tests' broker (``settings`` picks the embedded one for
    a test marked ``embedded``)."""
    return broker.bootstrap


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings with topics and a consumer group no other test uses, on this test's broker
    (the embedded one for a test marked ``embedded``); the topics exist."""
    name = "embedded_broker" if request.node.get_closest_marker("embedded") else "broker"
    return make_settings(request.getfixturevalue(name).bootstrap, tmp_path)


def make_settings(bootstrap: str, tmp_path: Path) -> Settings:
    """Settings on ``bootstrap`` with topics and a consumer group of their own, created, and a
    state directory under ``tmp_path``."""
    run = uuid.uuid4().hex[:8]
    settings = Settings.of(
        bootstrap_servers=bootstrap,
        orders_topic=f"orders-{run}", predictions_topic=f"predictions-{run}",
        drift_topic=f"drift-{run}", dlq_topic=f"orders.dlq-{run}",
        drift_reports_topic=f"drift.reports-{run}", drift_group_id=f"triage-drift-{run}",
        inventory_topic=f"inventory-{run}", payments_topic=f"payments-{run}",
        zip_codes_topic=f"zip_codes-{run}", reference_dlq_topic=f"reference.dlq-{run}",
        models_topic=f"models.control-{run}", shadow_topic=f"predictions.shadow-{run}",
        group_id=f"triage-scorer-{run}", state_dir=str(tmp_path / "state"),
    )
    create_topics(settings.connection, settings.topics, reference_topic_partitions(settings.topics))
    return settings


@pytest.fixture(scope="module")
def live_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 orders over one week, with their reference histories (ties included)."""
    path = tmp_path_factory.mktemp("live")
    generate(LIVE_ORDERS, 23, path, weeks=1)
    return path


@pytest.fixture(scope="module")
def expected(live_data: Path) -> dict[str, dict]:
    """order_id -> the four features merge_asof gives over the complete CSVs (and the windowed
    ones null)."""
    frame = oracle(live_data)
    ids = read_orders_csv(live_data / "orders.csv").order_id
    return {order_id: {"order_hour_of_day": int(row.order_hour_of_day),
                       "inventory": None if np.isnan(row.inventory) else float(row.inventory),
                       "payment_status": row.payment_status,
                       "zip_code_available": bool(row.zip_code_available),
                       **dict.fromkeys(WINDOWED_NAMES)}  # null: the model reads none
            for order_id, row in zip(ids, frame.itertuples(), strict=True)}


@pytest.fixture(scope="session")
def fresh_settings(bootstrap: str) -> SettingsFactory:
    """make_settings on this process's broker, for fixtures wider than a test (``settings`` is
    one test's): settings with topics and a group of their own, under the given directory."""
    return lambda tmp_path: make_settings(bootstrap, tmp_path)
