"""The ``triage`` command line. It only parses flags and wires the other packages together."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from confluent_kafka import KafkaException

from triage.bus.apache_kafka import KAFKA_VERSION, ApacheKafka
from triage.bus.embedded import (
    BrokerNotFound,
    EmbeddedBroker,
    clear_state,
    resolve_bootstrap,
    running_embedded,
    write_state,
)
from triage.bus.errors import (
    EXIT_CONFIGURATION,
    EXIT_INFRASTRUCTURE,
    InfrastructureError,
    exit_status,
    is_expected,
)
from triage.bus.interrupt import EXIT_INTERRUPTED, Interrupt
from triage.bus.logs import configure_logging
from triage.bus.settings import SettingsError
from triage.model.streams import REFERENCE_STREAMS
from triage.settings import Settings, settings_rows, unknown_variables

EXIT_FAILED = EXIT_INFRASTRUCTURE
EXIT_USAGE = EXIT_CONFIGURATION

if TYPE_CHECKING:
    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _connection_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and topics (override TRIAGE_* variables)")
    group.add_argument("--bootstrap", dest="bootstrap_servers", metavar="HOST:PORT",
                       help="Kafka bootstrap servers (TRIAGE_BOOTSTRAP_SERVERS)")
    group.add_argument("--schema-registry-url", metavar="URL",
                       help="Schema Registry URL (TRIAGE_SCHEMA_REGISTRY_URL)")
    group.add_argument("--orders-topic", metavar="NAME")
    group.add_argument("--predictions-topic", metavar="NAME")
    group.add_argument("--drift-topic", metavar="NAME")
    group.add_argument("--dlq-topic", metavar="NAME")
    group.add_argument("--log-format", choices=["json", "console"])
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return common


def build_parser() -> argparse.ArgumentParser:
    """``triage``'s parser: one function per command adds it (``_add_train``, ...), in the
    order ``triage --help`` lists them; docs/cli.md's reference is generated from it."""
    common = _connection_flags()
    parser = argparse.ArgumentParser(
        prog="triage", description="Streaming order triage on Kafka: Avro orders in, XGBoost "
        "recommendations out. Settings come from TRIAGE_* variables; flags override them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_broker, _add_topics, _add_datagen, _add_drift, _add_train, _add_replay,
                _add_produce, _add_consume, _add_worker, _add_windows, _add_models, _add_lag,
                _add_predictions, _add_demo, _add_dlq, _add_bench, _add_serve, _add_settings):
        add(commands, common)
    return parser


def _add_broker(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("broker", parents=[common],
                            help="run a local broker until Ctrl-C: the embedded Kafka-compatible "
                                 "one (tansu), or Apache Kafka with --kafka")
    p.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    p.add_argument("--kafka", action="store_true",
                   help="Apache Kafka (single-node KRaft, from Maven Central's jars; needs "
                        "Java 17+) instead of the embedded broker")


def _add_topics(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("topics", parents=[common], help="manage the service's topics")
    p.add_argument("action", choices=["create"])
    p.add_argument("--orders-partitions", type=int)
    p.add_argument("--output-partitions", type=int)
    p.add_argument("--replication-factor", type=int)


def _add_datagen(commands: Commands, common: argparse.ArgumentParser) -> None:
    from triage.model.scenarios import SCENARIOS

    p = commands.add_parser("datagen", parents=[common], help="generate the four input CSVs")
    p.add_argument("--orders", type=int, default=20_000, help="how many orders (default 20000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--weeks", type=int, default=4, help="weeks the orders span (default 4)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the CSVs to")
    p.add_argument("--shift", choices=list(SCENARIOS), metavar="SCENARIO",
                   help="the same data with one realistic shift: " + "; ".join(
                       f"{name}: {what}" for name, what in SCENARIOS.items()).replace("%", "%%"))


def _add_drift(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("drift", help="drift monitoring: the monitor and its HTML report")
    drift = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = drift.add_parser("monitor", parents=[common],
                         help="compare windows of the drift topic with the training baseline")
    p.add_argument("--model", type=Path, required=True,
                   help="model directory whose manifest holds the training baseline")
    p.add_argument("--group", dest="drift_group_id", metavar="G", help="TRIAGE_DRIFT_GROUP_ID")
    p.add_argument("--window-samples", dest="drift_window_samples", type=int, metavar="N",
                   help="TRIAGE_DRIFT_WINDOW_SAMPLES (default 1000)")
    p.add_argument("--window-minutes", dest="drift_window_minutes", type=float, metavar="T",
                   help="TRIAGE_DRIFT_WINDOW_MINUTES (default 0: by count only)")
    p.add_argument("--min-samples", dest="drift_min_samples", type=int, metavar="N",
                   help="TRIAGE_DRIFT_MIN_SAMPLES (default 500)")
    p.add_argument("--alpha", dest="drift_alpha", type=float, metavar="A",
                   help="TRIAGE_DRIFT_ALPHA (default 0.01)")
    p.add_argument("--metrics-port", dest="drift_metrics_port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics here (TRIAGE_DRIFT_METRICS_PORT)")
    p.add_argument("--reports-topic", dest="drift_reports_topic", metavar="NAME")
    p = drift.add_parser("report", parents=[common],
                         help="write a self-contained HTML page of the latest drift reports")
    p.add_argument("--out", type=Path, default=Path("report.html"))
    p.add_argument("--last", type=int, default=20, help="windows in the trends (default 20)")
    p.add_argument("--idle", type=float, default=3.0,
                   help="stop reading after this many seconds with nothing new")
    p.add_argument("--reports-topic", dest="drift_reports_topic", metavar="NAME")


def _add_train(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("train", parents=[common], help="train and save the model")
    p.add_argument("--data", type=Path, required=True, help="directory with the four CSVs")
    p.add_argument("--out", type=Path, help="model directory to write")
    p.add_argument("--registry", type=Path,
                   help="also (or, without --out, only) add the model to this registry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.995,
                   help="refuse to save a model below this holdout accuracy (default 0.995)")
    p.add_argument("--windowed", metavar="NAMES",
                   help="also train on these windowed features (comma-separated, or 'all'; "
                   "see `triage windows`), computed offline from orders.csv; the scorer "
                   "then joins the feature stage's values for the model")
    p.add_argument("--policy", choices=["v1", "v2"], default="v1",
                   help="the policy that labels the history: v1, the original exercise's "
                   "(default); v2, v1 that also declines a customer's 4th order within an "
                   "hour (trains on customer_orders_1h; see datagen --shift customer-bursts)")
    _encoding_flag(p)


def _add_replay(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "replay", parents=[common],
        help="publish orders.csv as orders, or a directory's four CSVs merged in event time")
    p.add_argument("csv", type=Path, metavar="FILE_OR_DIR",
                   help="orders.csv, or a directory with the four CSVs")
    p.add_argument("--streams", help="with a directory: which of orders,payments,inventory,"
                   "zip_codes to publish (default all)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="records per second (all streams together)")
    pace.add_argument("--speedup", type=float,
                      help="pace by the orders' timestamps; 3600 = an hour of orders per second")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out the first N records (in the order they are published): "
                        "an interrupted replay prints the --skip that resumes it")
    p.add_argument("--limit", type=int, help="publish only the first N records (after --skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _encoding_flag(p)


def _add_produce(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "produce", parents=[common],
        help="publish an event by hand (an order, a payment, a stock level, a zip roll-out) "
             "from flags, or many from JSON lines on stdin")
    p.add_argument("stream", nargs="?", default="order",
                   choices=["order", *(s.schema for s in REFERENCE_STREAMS)],
                   help="which stream (default order)")
    p.add_argument("--order-id", help="order and payment")
    p.add_argument("--customer-id", help="order")
    p.add_argument("--sku", help="order and inventory: the SKU code")
    p.add_argument("--zip", help="order and zip_code: the zip code")
    p.add_argument("--status", help="payment: its status; OK lets the order through, any "
                                    "other (FAILED, VERIFY_ADDRESS, ...) holds it")
    p.add_argument("--inventory", type=float, metavar="UNITS", help="inventory: the stock level")
    p.add_argument("--timestamp", help="order, payment, inventory: YYYY-MM-DD HH:MM:SS, UTC, "
                                       "or ISO 8601 (default: now)")
    p.add_argument("--available-from", metavar="TIME",
                   help="zip_code: delivery available from, YYYY-MM-DD HH:MM:SS, UTC, or ISO "
                        "8601 (default: now)")
    for stream in REFERENCE_STREAMS:  # a stream declared later: a flag per column
        for column in stream.csv_columns:
            if column not in _PRODUCE_FLAGS:
                p.add_argument(_produce_flag(column), help=f"{stream.schema}: its {column}")
    p.add_argument("--stdin", action="store_true",
                   help="read JSON lines from stdin instead of flags: each an object of the "
                        "stream's CSV columns (a \"stream\" field picks another stream)")


# triage produce: the columns of the streams' CSVs and the flags that give them (a flag's dest
# is its name); a column of a stream declared later gets --<column> (_produce_flag).
_PRODUCE_FLAGS = {"order_id": "--order-id", "customer_id": "--customer-id", "sku_code": "--sku",
                  "zip_code": "--zip", "payment_status": "--status", "inventory": "--inventory",
                  "timestamp": "--timestamp", "available_from": "--available-from"}


def _produce_flag(column: str) -> str:
    return _PRODUCE_FLAGS.get(column, "--" + column.replace("_", "-"))


def _add_consume(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("consume", parents=[common],
                            help="run N scorer workers in the consumer group")
    p.add_argument("--workers", default="1",
                   help="worker processes, or 'auto' to scale on lag between --min and --max")
    p.add_argument("--min", dest="min_workers", type=int, default=1,
                   help="with --workers auto: fewest workers (default 1)")
    p.add_argument("--max", dest="max_workers", type=int, default=4,
                   help="with --workers auto: most workers (default 4)")
    p.add_argument("--scale-interval", type=float, default=5.0,
                   help="with --workers auto: seconds between lag samples (default 5); a "
                   "decision needs a window of 6 samples")
    _membership_flags(p)
    _model_source(p)
    p.add_argument("--reference", type=Path,
                   help="directory with inventory.csv, payments.csv, zip_codes.csv: loaded "
                   "first, as a snapshot; the reference topics apply on top either way")
    _batch_flags(p)
    _encoding_flag(p)


def _add_worker(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "worker", parents=[common],
        help="one scorer worker in this process, no supervisor (a Kubernetes pod's command)")
    _model_source(p)
    p.add_argument("--reference", type=Path,
                   help="reference CSVs loaded first, as a snapshot (as for consume)")
    _batch_flags(p)
    _membership_flags(p)
    p.add_argument("--metrics-port", dest="metrics_port", type=int, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz here (TRIAGE_METRICS_PORT)")
    p.add_argument("--worker-id", default="0",
                   help="this worker's number: its transactional id and metrics port offset")
    _encoding_flag(p)


def _add_windows(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "windows", parents=[common],
        help="run one instance of the feature stage: windowed features per order, computed "
             "in state keyed by entity (run more to share the work)",
        description="Reads the orders in the group TRIAGE_WINDOWS_GROUP_ID, repartitions them "
                    "by entity, keeps each entity's windows in a store restored from its "
                    "changelog, and publishes each order's windowed feature values to "
                    "TRIAGE_WINDOWED_FEATURES_TOPIC (docs/how-it-works.md, \"Windowed "
                    "features\"). Needs the topics of `triage topics create`.")
    p.add_argument("--group", dest="windows_group_id", metavar="G",
                   help="TRIAGE_WINDOWS_GROUP_ID (default triage-windows)")
    p.add_argument("--features", dest="windowed_features", metavar="NAMES",
                   help="TRIAGE_WINDOWED_FEATURES: names separated by commas (default: all)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz here (TRIAGE_METRICS_PORT)")


def _add_models(commands: Commands, common: argparse.ArgumentParser) -> None:
    models = commands.add_parser(
        "models", help="the model registry: list versions, promote, roll back")
    actions = models.add_subparsers(dest="models_command", required=True)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("--registry", type=Path, required=True, help="model registry directory")
        return a

    def by(a: argparse.ArgumentParser) -> None:
        a.add_argument("--by", help="who makes the change (default: your user name)")

    action("list", "the registry's versions and which one is active")
    a = action("promote", "make a version active: every worker swaps to it")
    a.add_argument("version", help="a version id, as `triage models list` shows, or an MLflow "
                                   "model, models:/NAME/VERSION (with "
                                   "TRIAGE_MLFLOW_TRACKING_URI)")
    a.add_argument("--min-accuracy", type=float, default=0.995,
                   help="refuse a version whose holdout accuracy against the policy is below "
                        "this (default 0.995)")
    a.add_argument("--force", action="store_true",
                   help="promote even below --min-accuracy, below the active version's live "
                        "agreement with the policy, or without a passed backtest where "
                        "--require-backtest asks for one (recorded)")
    a.add_argument("--minutes", type=float, default=60.0,
                   help="a version in shadow: compare its live agreement with the policy over "
                        "the last M minutes (default 60)")
    a.add_argument("--require-backtest", action="store_true",
                   help="refuse a version without a passed backtest (`triage models "
                        "backtest`): over 1,000 orders or more, agreement with the policy at "
                        "least --min-agreement and at most 0.1 points below the active "
                        "version's; the report's id is recorded in the state")
    _min_agreement(a)
    by(a)
    by(action("rollback", "make the previous active version active again"))
    a = action("shadow", "score a version beside the active one, to the shadow topic")
    which = a.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", help="a version id")
    which.add_argument("--clear", action="store_true", help="stop shadow scoring")
    by(a)
    a = action("compare", "agreement of the shadow version with the active one")
    a.add_argument("--minutes", type=float, default=60.0,
                   help="predictions scored in the last M minutes (default 60)")
    a.add_argument("--idle", type=float, default=3.0,
                   help="stop reading after this many seconds with nothing new")
    a.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = action("backtest", "score a version over the history in Kafka (or --data DIR) with "
                           "the features as they were, against the active version and the "
                           "policy; publishes nothing, commits nothing")
    a.add_argument("version", help="the candidate: a version id of the registry")
    a.add_argument("--from", dest="from_time", metavar="TIME",
                   help="first order time, UTC, YYYY-MM-DD HH:MM:SS or ISO 8601 (default: the "
                        "beginning)")
    a.add_argument("--to", dest="to_time", metavar="TIME",
                   help="last order time, as --from (default: the end)")
    a.add_argument("--data", type=Path, metavar="DIR",
                   help="score a data directory's CSVs instead of Kafka (no broker needed)")
    a.add_argument("--active", metavar="VERSION",
                   help="the version to compare with (default: the active one on the control "
                        "topic; with --data, none unless given)")
    a.add_argument("--out", type=Path, default=Path("backtests"),
                   help="directory for the report's JSON and HTML (default ./backtests)")
    _min_agreement(a)
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    _encoding_flag(a)


def _min_agreement(a: argparse.ArgumentParser) -> None:
    a.add_argument("--min-agreement", type=float, default=0.99,
                   help="a backtest passes only if the candidate agrees with the policy on at "
                        "least this share of the orders (default 0.99)")


def _add_lag(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("lag", parents=[common],
                            help="committed offset, end offset and lag per partition")
    p.add_argument("--group", dest="group_id", help="consumer group (TRIAGE_GROUP_ID)")


def _add_predictions(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("predictions", parents=[common],
                            help="print the predictions from the beginning, as JSON lines, and "
                                 "a per-class summary on stderr")
    p.add_argument("--order-id", dest="order_ids", action="append", metavar="ID",
                   help="only this order's predictions (repeat for more); with --follow, "
                        "waits for them and for their corrections")
    p.add_argument("--follow", action="store_true", help="keep waiting for new predictions")
    p.add_argument("--idle", type=float, default=5.0,
                   help="without --follow, stop after this many seconds with nothing new")
    p.add_argument("--out", type=Path, help="write to this .jsonl file instead of stdout")
    p.add_argument("--all-revisions", action="store_true",
                   help="every record as published, corrected revisions and all (default: "
                        "the highest revision of each order)")


def _add_demo(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("demo", parents=[common],
                            help="generate, train, start broker and 2 workers, replay, report")
    p.add_argument("--data", type=Path, help="use these CSVs instead of generating 20k orders")
    p.add_argument("--model", type=Path, default=Path("artifacts/demo"),
                   help="model directory; trained there unless it exists (default "
                        "artifacts/demo)")
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="directory for predictions.jsonl and the summary (default results)")
    _encoding_flag(p)


def _add_dlq(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("dlq", parents=[common], help="inspect or replay dead letters")
    p.add_argument("action", choices=["inspect", "replay"])
    p.add_argument("--reason", help="replay: only records dead-lettered for this reason")
    p.add_argument("--samples", type=int, default=3, help="inspect: samples per reason")
    p.add_argument("--idle", type=float, default=3.0,
                   help="stop reading after this many seconds with nothing new")


def _add_bench(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "bench", parents=[common],
        help="benchmark the scorer against passthrough and per-message scoring, and on the live "
             "reference streams, in one run")
    p.add_argument("--orders", type=int, default=200_000,
                   help="orders every configuration consumes (default 200000)")
    p.add_argument("--batch-size", type=int, help="orders per batch (TRIAGE_BATCH_SIZE)")
    p.add_argument("--batch-timeout-ms", type=int, help="TRIAGE_BATCH_TIMEOUT_MS")
    p.add_argument("--partitions", type=int, default=12,
                   help="partitions of the benchmark's orders topic (default 12)")
    p.add_argument("--rate", type=float, default=5_000.0,
                   help="offered load for the fixed-load latency figure (default 5000/s)")
    p.add_argument("--latency-seconds", type=float, default=10.0,
                   help="how long that load is offered (default 10)")
    p.add_argument("--latency-partitions", type=int, default=2,
                   help="partitions of the latency topic (default 2; docs/benchmarks.md)")
    p.add_argument("--saturation-orders", type=int, default=50_000,
                   help="burst published as fast as possible for the saturation latency "
                        "(default 50000)")
    p.add_argument("--scaling-workers", type=int, default=2,
                   help="workers for the scaling figure, against 1 (0 skips it; default 2)")
    p.add_argument("--sweep", default="10,50,100,250,500,1000,2000",
                   help="batch sizes for the throughput plot, comma-separated ('' skips it)")
    p.add_argument("--sweep-orders", type=int, default=50_000,
                   help="orders per point of the batch-size sweep (default 50000)")
    p.add_argument("--per-message-orders", type=int, default=20_000,
                   help="orders the per-message baseline scores (default 20000; it runs at "
                        "about 500/s)")
    p.add_argument("--restore-records", type=int, default=0,
                   help="stock events for the live path's restore figure, e.g. 1000000 (the "
                        "worker's memory with a million reference rows); default 0 skips it")
    p.add_argument("--models", action="store_true",
                   help="also the model registry figures: throughput with a shadow version "
                        "against without, and promote -> first prediction (docs/benchmarks.md)")
    p.add_argument("--http", action="store_true",
                   help="also triage serve's figures against a per-request baseline: p50/p99 "
                        "at 500 requests/s, saturation, the batch call, /healthz and /readyz while "
                        "10,000-order batches run (docs/benchmarks.md)")
    p.add_argument("--broker", choices=["embedded", "kafka"], default="embedded",
                   dest="bench_broker",
                   help="the broker it starts when none is configured: the embedded one "
                        "(default) or Apache Kafka (Java 17+; docs/benchmarks.md)")
    p.add_argument("--timing", action="store_true",
                   help="also corrections and flags per 10,000 orders under simulated late, "
                        "bursty reference producers, by lateness allowance (no broker)")
    p.add_argument("--backtest", action="store_true",
                   help="also `triage models backtest`: its orders/s from Kafka and from the "
                        "CSVs against the scorer's, and its peak RSS over --backtest-orders "
                        "orders and over 4 times as many (docs/benchmarks.md)")
    p.add_argument("--backtest-orders", type=int, default=1_000_000,
                   help="orders of the backtest's memory figure, generated; its second run has "
                        "4 times as many (default 1000000)")
    p.add_argument("--windows", action="store_true",
                   help="also the feature stage (`triage windows`): its throughput over the "
                        "orders against the scorer's, the restore of its stores from their "
                        "changelogs against a bare read, their memory per 100k keys")
    p.add_argument("--profile", action="store_true",
                   help="also the scorer once more under py-spy (dev requirements): its CPU per "
                        "order by stage, decode to commit (docs/benchmarks.md)")
    p.add_argument("--ab-module", metavar="MODULE",
                   help="also (b) as run by this module (e.g. an earlier commit's worker, "
                        "docs/benchmarks.md) against --scorer-module, interleaved")
    p.add_argument("--ab-pairs", type=int, default=3,
                   help="runs of each side for --ab-module (default 3)")
    p.add_argument("--data", type=Path, help="orders.csv and reference CSVs (default: generated)")
    p.add_argument("--model", type=Path, help="model directory (default: trained on the data)")
    p.add_argument("--out", type=Path, default=Path("results/bench"),
                   help="where bench.json, the plots and the worker logs go (default "
                        "results/bench)")
    p.add_argument("--scorer-module", default="triage.consumer.worker",
                   help="module run as (b), the scorer as shipped (default "
                        "triage.consumer.worker), for A/B-testing a changed hot path")
    p.add_argument("--keep-topics", action="store_true", help="do not delete the bench topics")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_serve(commands: Commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "serve", parents=[common],
        help="the HTTP front door: POST /decision/v1 (and its batch form), asynchronous "
             "calls through Kafka, /healthz, /readyz, /metrics")
    _model_source(p)
    p.add_argument("--reference", type=Path,
                   help="directory of the reference CSVs (a snapshot): the answers are joined "
                        "with them and, with a broker, the reference streams on top; needed "
                        "without a broker")
    p.add_argument("--port", dest="gateway_port", type=int,
                   help="HTTP port (TRIAGE_GATEWAY_PORT, default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--encoding", dest="csv_encoding", metavar="NAME",
                   help="text encoding of the CSVs (TRIAGE_CSV_ENCODING, default utf-8)")


def _add_settings(commands: Commands, common: argparse.ArgumentParser) -> None:
    commands.add_parser("settings", help="list every TRIAGE_* setting with its default")


def _encoding_flag(p: argparse.ArgumentParser) -> None:
    """--encoding: the CSVs' text encoding."""
    p.add_argument("--encoding", dest="csv_encoding", metavar="NAME",
                   help="text encoding of the CSVs (TRIAGE_CSV_ENCODING; default utf-8)")


def _batch_flags(p: argparse.ArgumentParser) -> None:
    """A scorer's consumer group and batches (consume, worker)."""
    p.add_argument("--group", dest="group_id", help="consumer group (TRIAGE_GROUP_ID)")
    p.add_argument("--batch-size", type=int, help="orders per batch (TRIAGE_BATCH_SIZE)")
    p.add_argument("--batch-timeout-ms", type=int, help="TRIAGE_BATCH_TIMEOUT_MS")
    p.add_argument("--sample-rate", type=float, help="drift sample share (TRIAGE_SAMPLE_RATE)")


def _membership_flags(p: argparse.ArgumentParser) -> None:
    """A scorer's transactions and group membership (consume, worker)."""
    p.add_argument("--exactly-once", action="store_true", default=None,
                   help="transactional consume-transform-produce (TRIAGE_EXACTLY_ONCE)")
    p.add_argument("--instance-id", dest="instance_id", metavar="ID",
                   help="static group membership, e.g. the pod name (TRIAGE_INSTANCE_ID)")
    p.add_argument("--group-protocol", dest="group_protocol", choices=["classic", "consumer"],
                   help="consumer group protocol; consumer: KIP-848 (TRIAGE_GROUP_PROTOCOL)")


def _model_source(p: argparse.ArgumentParser) -> None:
    """--model DIR or --registry DIR, one of them."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model directory")
    source.add_argument("--registry", type=Path,
                        help="model registry: score with the version `triage models promote` "
                             "made active, and swap to each new one between batches")


def _settings(args: argparse.Namespace) -> Settings:
    names = ("bootstrap_servers", "schema_registry_url", "orders_topic", "predictions_topic",
             "drift_topic", "dlq_topic", "log_format", "log_level", "orders_partitions",
             "output_partitions", "replication_factor", "group_id", "batch_size",
             "batch_timeout_ms", "sample_rate", "exactly_once", "drift_reports_topic",
             "drift_group_id", "drift_window_samples", "drift_window_minutes",
             "drift_min_samples", "drift_alpha", "drift_metrics_port", "csv_encoding",
             "metrics_port", "gateway_port", "instance_id", "group_protocol",
             "windows_group_id", "windowed_features")
    for name, closest in unknown_variables(os.environ):
        print(f"warning: {name} is not a setting and is ignored"
              + (f" (did you mean {closest}?)" if closest else "")
              + "; `triage settings` lists them", file=sys.stderr)
    settings = Settings.from_env().replace(**{n: getattr(args, n, None) for n in names})
    if getattr(args, "log_format", None) is None and "TRIAGE_LOG_FORMAT" not in os.environ \
            and sys.stderr.isatty():
        settings = settings.replace(log_format="console")  # people at a terminal read console
    return settings


def _resolved(settings: Settings) -> Settings:
    return settings.replace(
        bootstrap_servers=resolve_bootstrap(settings.connection.bootstrap_servers,
                                            settings.connection.state_dir))


# -- commands --------------------------------------------------------------------------------

def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    existing = running_embedded(settings.connection.state_dir)
    if existing:
        print(f"error: a broker started by `triage broker` is already running on {existing}",
              file=sys.stderr)
        return EXIT_USAGE
    state_dir = Path(settings.connection.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedBroker | ApacheKafka
    if args.kafka:
        log_path = state_dir / "kafka.log"
        broker = ApacheKafka(port=args.port, log_path=log_path)
        what = (f"Apache Kafka {KAFKA_VERSION} (KRaft, one node; its data is removed when it "
                "stops)")
    else:
        log_path = state_dir / "tansu.log"
        broker = EmbeddedBroker(port=args.port, log_path=log_path)
        what = "embedded broker (tansu, in-memory)"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    bootstrap = broker.start()
    write_state(settings.connection.state_dir, bootstrap, os.getpid())
    print(f"{what} listening on {bootstrap}; Ctrl-C stops it", flush=True)
    try:
        while not stop.wait(0.5) and broker.process is not None \
                and broker.process.poll() is None:
            pass
    finally:
        clear_state(settings.connection.state_dir, os.getpid())
        crashed = broker.process is not None and broker.process.poll() is not None
        broker.stop()
    if crashed:
        print(f"error: the broker exited unexpectedly; see {log_path}", file=sys.stderr)
        return EXIT_FAILED
    print("broker stopped", flush=True)
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from triage.bus.clients import create_topics
    from triage.consumer.window_stage import chosen_features, retention_ms
    from triage.model.streams import reference_topic_partitions
    from triage.model.windows import window_topic_specs

    windows = window_topic_specs(settings.topics, chosen_features(settings.windows.names()),
                                 retention_ms(settings))
    for name, outcome in create_topics(settings.connection, settings.topics,
                                       reference_topic_partitions(settings.topics),
                                       windows).items():
        print(f"{name}: {outcome}")
    return 0


def cmd_windows(args: argparse.Namespace, settings: Settings) -> int:
    """``triage windows``: one feature stage instance until SIGTERM or SIGINT, which finish
    the turn (its transaction) and leave the group."""
    from triage.consumer.window_stage import WindowStage

    stage = WindowStage(settings, worker_id=str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: stage.request_stop())
    signal.signal(signal.SIGINT, lambda *_: stage.request_stop())
    try:
        stage.run(settings.scorer.batch_size, settings.scorer.batch_timeout_ms / 1000)
    finally:
        stage.close()
    return 0


def cmd_datagen(args: argparse.Namespace, settings: Settings) -> int:
    from triage.model.datagen import generate

    paths = generate(args.orders, args.seed, args.out, weeks=args.weeks, shift=args.shift)
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def cmd_drift(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "report":
        from triage.consumer.drift_report import (
            open_window_note,
            read_reports,
            render,
            unreported_samples,
        )

        reports = read_reports(settings.connection, settings.topics.drift_reports_topic,
                               idle_s=args.idle)
        note = open_window_note(unreported_samples(settings.connection,
                                                   settings.topics.drift_topic, reports),
                                settings, reports)
        args.out.write_text(render(reports, last=args.last, open_window=note))
        latest = reports[-1]["status"] if reports else "no reports yet"
        print(f"wrote {args.out}: {min(len(reports), args.last)} window(s), latest: {latest}")
        print(note)
        return 0

    from triage.consumer.drift_monitor import DriftMonitor
    from triage.model.artifact import verify

    monitor = DriftMonitor(settings.connection, settings.topics, settings.drift, verify(args.model),
                           health_stall_ms=settings.scorer.health_stall_ms)
    signal.signal(signal.SIGTERM, lambda *_: monitor.request_stop())
    signal.signal(signal.SIGINT, lambda *_: monitor.request_stop())
    try:
        monitor.run()
    finally:
        monitor.close()
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """``triage serve`` (gateway/): scores with ``--model`` or the registry's active version
    and the ``--reference`` CSVs; with a broker (flag, TRIAGE_BOOTSTRAP_SERVERS or a running
    ``triage broker``) it also publishes its decisions and serves the asynchronous calls."""
    from triage.gateway.server import run_gateway
    from triage.model.reference import check_reference_dir

    _check_model_source(args)
    if args.reference:
        check_reference_dir(args.reference, settings.data.csv_encoding)
    try:
        settings, broker = _resolved(settings), True
    except BrokerNotFound:
        if args.reference is None:
            raise SettingsError("without a broker, triage serve needs --reference DIR (the "
                                "reference CSVs); with one it reads the reference streams"
                                ) from None
        broker = False
    return run_gateway(settings, model_dir=args.model, registry_dir=args.registry,
                       reference_dir=args.reference, host=args.host, broker=broker)


def _windowed_names(args: argparse.Namespace) -> list[str]:
    """``--windowed``: the names given, every declared one for 'all', none without it."""
    if not args.windowed:
        return []
    if args.windowed.strip() == "all":
        from triage.model.features import WINDOWED_NAMES

        return list(WINDOWED_NAMES)
    return [name.strip() for name in args.windowed.split(",") if name.strip()]


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile

    from triage.model.registry import Registry
    from triage.model.train import train

    if args.out is None and args.registry is None and not settings.mlflow.mlflow_tracking_uri:
        raise SettingsError("train needs --out DIR, --registry DIR or TRIAGE_MLFLOW_TRACKING_URI "
                            "(any of them)")
    if settings.mlflow.mlflow_tracking_uri:
        from triage.model import mlflow_registry

        mlflow_registry.check_installed(settings.mlflow)  # before training, not after it
    with tempfile.TemporaryDirectory(prefix="triage-train-") as scratch:
        out = args.out or Path(scratch) / "model"
        report = train(args.data, out, seed=args.seed, min_accuracy=args.min_accuracy,
                       encoding=settings.data.csv_encoding, windowed=_windowed_names(args),
                       policy=args.policy)
        if args.registry is not None:
            added = Registry(args.registry).add(out)
            print(f"added {added.version} to the registry {args.registry}; `triage models "
                  f"promote {added.version} --registry {shlex.quote(str(args.registry))}` "
                  "makes it active")
        if settings.mlflow.mlflow_tracking_uri:
            reference = mlflow_registry.log_training(settings.mlflow, out)
            print(f"logged the run and registered {reference} in MLflow at "
                  f"{settings.mlflow.mlflow_tracking_uri}")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"trained on {report.rows} orders (and {report.synthetic_rows} coverage rows: "
          "synthetic orders that show the model every combination of the rules, for fitting "
          f"only; docs/models.md); holdout accuracy against the policy "
          f"{report.holdout_accuracy:.4%}")
    print(report.confusion_table())
    if args.out is not None:
        print(f"model {report.version} written to {report.model_dir}")
    if report.windowed:
        print(f"the model reads the windowed features {', '.join(report.windowed)}: its "
              "scorers join them from the feature stage, so run `triage windows` beside them "
              "(orders wait for its answers up to TRIAGE_REFERENCE_MAX_WAIT_MS, then are "
              "scored with those features null); `triage serve` cannot know them "
              "(docs/models.md)")
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    """``triage replay``: 0 when everything handed over was delivered, 1 when some was not, 2
    when every row was refused (nothing to publish), 130 after Ctrl-C or SIGTERM (with the
    summary and the command that resumes)."""
    from triage.producer.replay import replay

    streams = [name.strip() for name in args.streams.split(",")] if args.streams else None
    with Interrupt() as stop:
        summary = replay(settings, args.csv, streams=streams, rate=args.rate,
                         speedup=args.speedup, limit=args.limit, skip=args.skip,
                         progress=not args.no_progress, stop=stop)
    print(summary)
    if summary.interrupted:
        left = None if args.limit is None else args.limit - summary.handed
        print(f"resume with: {resumed_command(sys.argv, summary.next_skip, left)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.refused_all:
        print(f"error: every row of {args.csv} was refused ({len(summary.skipped)} row(s)); "
              "nothing was published", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_FAILED if summary.failed else 0


def resumed_command(argv: list[str], skip: int, limit: int | None = None) -> str:
    """The command line ``argv`` (``sys.argv``) as a person types it, with ``--skip`` set to
    ``skip`` and, if given, ``--limit`` to ``limit`` (what the interrupted replay had left of
    its limit): what resumes an interrupted replay. The program is named as it was run (the
    full path of a ``triage`` script that is not on the PATH), so the line runs as printed."""
    program = argv[0] if argv and Path(argv[0]).name == "triage" else "triage"
    words, rest = [program], list(argv[1:])
    while rest:
        word = rest.pop(0)
        if word in ("--skip", "--limit"):
            rest = rest[1:]
        elif not word.startswith(("--skip=", "--limit=")):
            words.append(word)
    more = [] if limit is None else ["--limit", str(limit)]
    return shlex.join([*words, "--skip", str(skip), *more])


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    """``triage produce`` (producer/produce.py): 0 when what was not refused was published
    (refusals listed on stderr), 1 when a delivery failed, 2 when the flags are refused or
    every line was (nothing published), 130 after Ctrl-C."""
    from triage.producer.produce import event_record, json_rows, now_text, produce_events

    flag_of = {column: _produce_flag(column) for column in
               {*_PRODUCE_FLAGS, *(c for s in REFERENCE_STREAMS for c in s.csv_columns)}}
    given = {column: value for column, flag in flag_of.items()
             if (value := getattr(args, flag[2:].replace("-", "_"))) is not None}
    if args.stdin:
        if given:
            raise SettingsError(f"--stdin takes the events from stdin; leave out "
                                f"{', '.join(flag_of[column] for column in given)}")
        rows = json_rows(sys.stdin, args.stream)
    else:
        time_field = next((s.csv_time for s in REFERENCE_STREAMS if s.schema == args.stream),
                          "timestamp")
        row = {time_field: now_text(), **given}
        # refused here, before connecting (ISO 8601 times are taken, as the HTTP API takes them)
        event_record(args.stream, row, f"triage produce {args.stream}", flag_of)
        rows = iter([(1, args.stream, row)])
    summary = produce_events(_resolved(settings), rows, idempotent=args.stdin)
    for stream, key, topic, partition, offset in summary.delivered[:20]:
        print(f"published {stream} {key} to {topic} partition {partition} offset {offset}")
    if args.stdin or summary.failed or summary.interrupted:
        print(summary, file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.failed:
        return EXIT_FAILED
    if summary.refused and not summary.sent:
        print("error: every event was refused; nothing was published", file=sys.stderr)
        return EXIT_USAGE
    if not summary.sent:
        print("error: no event on stdin; nothing was published", file=sys.stderr)
        return EXIT_USAGE
    return 0  # as a replay: what was refused is listed, the rest published


def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    import structlog

    from triage.bus.clients import make_admin, partitions_of, require_topics
    from triage.consumer.autoscale import Autoscaler
    from triage.consumer.supervisor import Supervisor
    from triage.model.reference import check_reference_dir

    _check_model_source(args)  # fail here, once, rather than in every worker
    if args.reference:
        check_reference_dir(args.reference, settings.data.csv_encoding)
    settings = _resolved(settings)
    log = structlog.get_logger("supervisor")
    autoscaler = None
    if args.workers == "auto":
        autoscaler = Autoscaler(args.min_workers, args.max_workers,
                                grow_above=settings.scorer.batch_size)
        workers = args.min_workers
    elif args.workers.isdigit() and int(args.workers) >= 1:
        workers = int(args.workers)
    else:
        raise SettingsError(f"--workers must be a number >= 1 or 'auto', got {args.workers!r}")
    most = args.max_workers if autoscaler else workers
    try:
        admin = make_admin(settings.connection)
        # Before the topic is asked for by name, which has a broker with auto-creation make
        # it with its own partition count: a missing topic is exit 2, naming the command.
        require_topics(admin, [settings.topics.orders_topic])
        partitions = len(partitions_of(admin, settings.topics.orders_topic))
    except KafkaException as exc:  # the workers retry on their own; this check is advisory
        log.warning("partitions_unknown", topic=settings.topics.orders_topic, error=str(exc))
        partitions = most
    if most > partitions:
        log.warning("more_workers_than_partitions", workers=most, partitions=partitions,
                    note=f"{most - partitions} worker(s) will sit idle; add partitions to "
                    f"{settings.topics.orders_topic} to use them")
    supervisor = Supervisor(settings, args.model.resolve() if args.model else None,
                            args.reference.resolve() if args.reference else None, workers,
                            autoscaler=autoscaler, scale_interval_s=args.scale_interval,
                            registry_dir=args.registry.resolve() if args.registry else None)
    signal.signal(signal.SIGTERM, lambda *_: supervisor.request_stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.request_stop())
    log.info("starting", workers=args.workers, group=settings.scorer.group_id,
             exactly_once=settings.scorer.exactly_once)
    supervisor.start()
    supervisor.run()
    codes = supervisor.stop()
    if supervisor.failure:
        print(f"error: {supervisor.failure}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if all(code == 0 for code in codes.values()) else EXIT_FAILED


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """One worker, in this process: the exit statuses of a worker (consumer/worker.py): 0 after
    SIGTERM, 1 on an infrastructure failure (the orchestrator restarts it), 2 on configuration."""
    # As a pod's PID 1 a process ignores SIGTERM without a handler: stop (status 0, nothing
    # consumed yet) until run() installs the worker's own, which drains the batch in hand.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from triage.consumer.worker import end_process, run
    from triage.model.reference import check_reference_dir

    if not args.worker_id.isdigit():
        raise SettingsError(f"--worker-id must be a number >= 0, got {args.worker_id!r}")
    _check_model_source(args)
    if args.reference:
        check_reference_dir(args.reference, settings.data.csv_encoding)
    end_process(run(_resolved(settings), args.model.resolve() if args.model else None,
                    args.reference.resolve() if args.reference else None,
                    worker_id=args.worker_id,
                    registry_dir=args.registry.resolve() if args.registry else None,
                    serving_process=True))


def _check_model_source(args: argparse.Namespace) -> None:
    """--model: the artifact verifies; --registry: the registry exists (its versions are
    verified by each worker as they are promoted)."""
    from triage.model.artifact import verify
    from triage.model.registry import Registry

    if args.model:
        verify(args.model)
    else:
        Registry(args.registry).versions()


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    """``triage models list|promote|rollback|shadow|compare|backtest`` (scoring/follower.py,
    model/registry.py: the rules, which raise PromotionRefused or ChangeRefused, exit 2)."""
    from triage.model.mlflow_registry import MODELS_SCHEME
    from triage.model.registry import (
        Registry,
        check_accuracy,
        check_backtest,
        check_live,
        check_rollback,
        check_shadow,
    )
    from triage.scoring.follower import changed, publish_state, read_state

    registry = Registry(args.registry)
    if args.models_command == "promote" and args.version.startswith(MODELS_SCHEME):
        from triage.model.mlflow_registry import fetch

        with fetch(settings.mlflow, args.version) as downloaded:  # into the registry first
            added = registry.add(downloaded)  # verified against its manifest
        print(f"{args.version} is {added.version}; added to the registry {args.registry}")
        args.version = added.version
    if args.models_command == "backtest" and args.data is not None:
        return _backtest(args, settings, registry, None)
    settings = _resolved(settings)
    connection, topics = settings.connection, settings.topics
    if args.models_command == "backtest":
        return _backtest(args, settings, registry, None if args.active else
                         _active_or_none(connection, topics))
    if args.models_command == "compare":
        from triage.consumer.shadow import compare

        report = compare(connection, topics, since_ms=int((time.time() - args.minutes * 60)
                                                          * 1000), idle_s=args.idle,
                         policy_of=lambda v: _policy_of(registry, v))
        print(json.dumps(report) if args.json else report_text(report))
        return 0
    state = read_state(connection, topics)
    if args.models_command == "list":
        versions = registry.versions()
        print(f"{'version':<22}{'state':<11}{'created (UTC)':<27}{'holdout accuracy':>17}")
        for v in versions:
            label = ("active" if state and v.version == state.active
                     else "shadow" if state and v.version == state.shadow
                     else "previous" if state and v.version == state.previous else "candidate")
            if not v.complete:  # a copy not finished, or a changed file: cannot be promoted
                label = "unusable" if label == "candidate" else label
                print(f"{v.version:<22}{label:<11}cannot be served: {v.problem}")
                continue
            print(f"{v.version:<22}{label:<11}{v.created_at:<27}{v.holdout_accuracy:>17.4%}")
        if state is None:
            print("no version is active yet: `triage models promote VERSION --registry "
                  f"{shlex.quote(str(args.registry))}`")
        else:
            print(f"active {state.active} since {_when(state.changed_at_ms)} "
                  f"({state.action} by {state.changed_by}{', forced' if state.forced else ''})")
        return 0
    if args.models_command == "promote":
        version = registry.get(args.version)  # verified: a changed file is refused here
        forced = check_accuracy(version, args.min_accuracy, args.force)
        if state is not None and state.active == version.version:
            print(f"{version.version} is already active")
            return 0
        if forced:
            _forced(version.version, "min_accuracy", holdout_accuracy=version.holdout_accuracy,
                    min_accuracy=args.min_accuracy)
        if state is not None:
            live = _live_figures(connection, topics, version.version, state.active,
                                 args.minutes, version.policy)
            theirs, ours = live["shadow_policy_agreement"], live["active_policy_agreement"]
            if check_live(version.version, state.active, live["pairs"], theirs, ours,
                          args.force):
                _forced(version.version, "live", shadow_policy_agreement=theirs,
                        active_policy_agreement=ours)
                forced = True
        backtest: str | None = None
        if args.require_backtest:
            found = registry.latest_backtest(version.version)
            backtest = found["id"] if found else None
            if check_backtest(version.version, found, state.active if state else None,
                              args.min_agreement, args.force):
                _forced(version.version, "backtest", backtest=backtest or "none")
                forced = True
        shadow = state.shadow if state and state.shadow != version.version else None
        new = changed(version.version, state.active if state else None, "promote", args.by,
                      forced, shadow, backtest)
    elif args.models_command == "shadow":
        target = None if args.clear else registry.get(args.version).version
        check_shadow(state.active if state else None, target)
        assert state is not None  # check_shadow refused a shadow with no version active
        if target is not None:
            from triage.bus.clients import make_admin, partitions_of

            try:  # shadow predictions that cannot be delivered would fail every batch
                partitions_of(make_admin(connection), topics.shadow_topic)
            except KafkaException:
                raise SettingsError(f"the shadow topic {topics.shadow_topic} does not exist: "
                                    "`triage topics create` makes it") from None
        new = changed(state.active, state.previous, "shadow", args.by, state.forced, target)
        publish_state(connection, topics, new)
        print(f"shadow: {target or 'none'} beside {state.active}")
        return 0
    else:
        back = check_rollback(state.active if state else None,
                              state.previous if state else None)
        assert state is not None  # check_rollback refused a rollback with no version active
        registry.get(back)
        new = changed(back, state.active, "rollback", args.by,
                      shadow=state.shadow if state.shadow != back else None)
    publish_state(connection, topics, new)
    print(f"{new.action}: {new.active} is active (was {new.previous or 'none'}); workers "
          "following the registry swap to it between two batches")
    return 0


def _backtest(args: argparse.Namespace, settings: Settings, registry: Any,
              state: Any) -> int:
    """``triage models backtest`` (consumer/backtest.py): score the version over the history,
    print the summary, write the JSON and HTML reports to --out and keep the JSON in the
    registry for ``promote --require-backtest``. 0 when it ran, whatever it found."""
    from tqdm import tqdm

    from triage.consumer import backtest as bt
    from triage.consumer.backtest_report import write_html
    from triage.model import artifact
    from triage.model.registry import PromotionRefused, check_backtest
    from triage.model.tables import confusion_text
    from triage.producer.publisher import OrderError, parse_timestamp_ms
    from triage.scoring.validation import OrderValidator

    try:
        from_ms = parse_timestamp_ms(args.from_time) if args.from_time else None
        to_ms = parse_timestamp_ms(args.to_time) if args.to_time else None
    except OrderError as exc:
        raise SettingsError(f"--from/--to: {exc}") from None
    if from_ms is not None and to_ms is not None and from_ms > to_ms:
        raise SettingsError("--from is after --to")
    candidate = artifact.load(registry.get(args.version).path)
    active_id = args.active or (state.active if state is not None else None)
    notes: list[str] = []
    if active_id and not args.active and not (registry.root / active_id).is_dir():
        notes.append(f"the active version {active_id} is not in the registry {args.registry}: "
                     "compared with the policy alone")
        active_id = None
    active = artifact.load(registry.get(active_id).path) if active_id else None
    result = bt.Backtest(candidate.version, active.version if active else None,
                         f"data {args.data}" if args.data else "kafka", from_ms, to_ms)
    result.warnings += notes
    if args.data is not None:
        tables, batches = bt.data_history(args.data, encoding=settings.data.csv_encoding,
                                          from_ms=from_ms, to_ms=to_ms)
        published = None
    else:
        history = bt.kafka_history(settings, from_ms=from_ms, to_ms=to_ms)
        tables, batches, published = history.tables, history.batches, history.published
        result.warnings += history.warnings
    bar = tqdm(unit=" orders", disable=args.no_progress or not sys.stderr.isatty(),
               file=sys.stderr, desc="backtest")
    with bar:
        bt.run(candidate, active, tables, batches, result, progress=bar.update,
               published=published or (lambda batch: None),
               validator=OrderValidator(settings.validation))
    if not result.orders:
        raise bt.BacktestError("no orders in the range to backtest" + (
            f" ({args.from_time or 'the beginning'} to {args.to_time or 'the end'})"))
    report = result.as_dict()
    path = bt.write(result, args.out)
    html = write_html(report, path.with_suffix(".html"))
    kept = registry.save_backtest(report)
    span = " to ".join(_when(t) for t in (result.first_ms or 0, result.last_ms or 0))
    print(f"backtest {result.id}: {result.candidate} over {result.orders:,} orders ({span}), "
          f"{report['orders_per_s'] or 0:,} orders/s")
    for role, version in (("candidate", result.candidate), ("active", result.active)):
        agreement = result.policy_agreement(role)
        if agreement is not None:
            print(f"agreement with the policy: {agreement:.2%} ({role} {version})")
    if report["published_agreement"] is not None:
        print(f"agreement with the published predictions: {report['published_agreement']:.2%}"
              f" of {result.published_orders:,} orders")
    if result.refused:
        print("not scored (the workers would dead-letter them): " + ", ".join(
            f"{n:,} {reason}" for reason, n in sorted(result.refused.items())))
    if result.active is not None:
        changes = sum(n for row in report["changed_by_class"].values() for n in row.values())
        print(f"decisions that would change: {changes:,} of {result.orders:,}")
        print(confusion_text("active \\ candidate", report["classes"],
                             report["confusion"]["active_vs_candidate"]))
    else:
        print(confusion_text("candidate \\ policy", report["classes"],
                             report["confusion"]["candidate_vs_policy"]))
    for warning in result.warnings:
        print(f"warning: {warning}")
    try:
        check_backtest(result.candidate, report, result.active, args.min_agreement)
        verdict = f"passes the promotion gate at --min-agreement {args.min_agreement:.2%}"
    except PromotionRefused as exc:
        verdict = f"would not pass the promotion gate: {exc}"
    print(f"{result.candidate} {verdict}")
    print(f"report: {path} and {html}; kept as {kept} for `triage models promote "
          f"{result.candidate} --require-backtest`")
    return 0


def _active_or_none(connection: Any, topics: Any) -> Any:
    """The control topic's state, or None (with a warning on stderr) when it cannot be read:
    a backtest then compares the candidate with the policy alone."""
    from triage.scoring.follower import read_state

    try:
        return read_state(connection, topics, timeout_s=10.0)
    except InfrastructureError as exc:
        print(f"no active version reachable ({exc}): compared with the policy alone",
              file=sys.stderr)
        return None


def _policy_of(registry: Any, version: str) -> str:
    """The policy ``version`` was trained on (its manifest), v1 for a version the registry
    does not hold (one trained before policies had names, or elsewhere)."""
    from triage.bus.errors import ConfigurationError

    try:
        return str(registry.get(version).policy)
    except ConfigurationError:
        return "v1"


def _live_figures(connection: Any, topics: Any, version: str, active: str, minutes: float,
                  policy: str = "v1") -> dict[str, Any]:
    """What the live gate (model/registry.py's check_live) decides on: consumer/shadow.py's
    compare of ``version`` in shadow with ``active`` over the last ``minutes`` by ``policy``
    (the candidate's), read from the predictions and shadow topics and printed for the person
    promoting."""
    from triage.consumer.shadow import compare

    report = compare(connection, topics, since_ms=int((time.time() - minutes * 60) * 1000),
                     idle_s=2.0, shadow_version=version, active_version=active,
                     policy_of=lambda _: policy)
    if not report["pairs"]:
        print(f"live gate not applied: {version} has not run in shadow beside {active} in the "
              f"last {minutes:g} minutes")
    else:
        print(f"live: {version} agreed with policy {policy} on "
              f"{report['shadow_policy_agreement']:.2%} of {report['pairs']:,} orders, the "
              f"active {active} on {report['active_policy_agreement']:.2%}")
    return report


def _forced(version: str, gate: str, **figures: float | str) -> None:
    """Log that ``version`` was promoted past ``gate`` by --force, with the gate's figures."""
    import structlog

    structlog.get_logger("models").warning("promotion_forced", version=version, gate=gate,
                                           **figures)


def report_text(report: dict[str, Any]) -> str:
    """``triage models compare``'s figures for people."""
    lines = [f"{report['pairs']:,} orders scored by both {report['active']} (active) and "
             f"{report['shadow']} (shadow): agreement {report['agreement']:.2%}"]
    from triage.model.tables import confusion_text

    lines.append(confusion_text("active \\ shadow", report["classes"], report["confusion"]))
    lines.append(f"agreement with policy {report.get('policy', 'v1')} (the shadow's) on those "
                 f"orders: active "
                 f"{report['active_policy_agreement']:.2%}, shadow "
                 f"{report['shadow_policy_agreement']:.2%}")
    return "\n".join(lines)


def _when(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def cmd_lag(args: argparse.Namespace, settings: Settings) -> int:
    from triage.bus.offsets import group_lag

    rows = group_lag(settings.connection, settings.scorer.group_id, settings.topics.orders_topic)
    print(f"group {settings.scorer.group_id} on {settings.topics.orders_topic}")
    print(f"{'partition':>9} {'committed':>12} {'end':>12} {'lag':>10}")
    for row in rows:
        committed = "-" if row.committed is None else str(row.committed)
        print(f"{row.partition:>9} {committed:>12} {row.end:>12} {row.lag:>10}")
    print(f"{'total':>9} {'':>12} {sum(r.end for r in rows):>12} {sum(r.lag for r in rows):>10}")
    return 0


def cmd_predictions(args: argparse.Namespace, settings: Settings) -> int:
    """``triage predictions``: JSON lines on stdout (or ``--out``), nothing else there; the
    per-class summary on stderr. 130 after Ctrl-C (the summary still comes)."""
    from triage.consumer.reader import TopicReader, latest_revisions

    wanted = set(args.order_ids or ())
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
    count = 0
    latest: dict[str, dict[str, Any]] = {}
    with Interrupt() as stop, TopicReader(settings.connection,
                                          settings.topics.predictions_topic,
                                          "prediction") as reader:
        try:
            read = (record for _, record in reader.read(follow=args.follow, idle_s=args.idle,
                                                        stop=lambda: stop.requested,
                                                        until_end=True)
                    if not wanted or (record is not None and record["order_id"] in wanted))
            records: Iterable[dict[str, Any] | None] = read if args.all_revisions else \
                latest_revisions(read, streaming=args.follow)
            for record in records:
                if record is None:
                    continue
                out.write(json.dumps(record) + "\n")
                count += 1
                latest[record["order_id"]] = record
                if args.follow:
                    out.flush()
        finally:
            if args.out:
                out.close()
    print(predictions_summary(count, latest.values(), args.out), file=sys.stderr)
    if wanted - latest.keys() and not stop.requested:
        from triage.consumer.deadletter_topic import reasons_of

        missing = sorted(wanted - latest.keys())
        letters = reasons_of(settings, set(missing))
        for order_id in missing:
            if order_id in letters:
                print(f"{order_id} was dead-lettered on {settings.topics.dlq_topic}: "
                      f"{letters[order_id]} (`triage dlq inspect` shows it)", file=sys.stderr)
            else:
                print(f"no prediction (yet) of {order_id}, nor a dead letter", file=sys.stderr)
    return EXIT_INTERRUPTED if stop.requested else 0


def predictions_summary(count: int, latest: Iterable[dict[str, Any]], out: Path | None
                        ) -> str:
    """``triage predictions``' summary: records written, orders, each class's count among the
    orders' latest records, corrections and flags (stderr, so stdout stays JSON lines)."""
    from collections import Counter

    latest = list(latest)
    classes = Counter(r["recommendation"] for r in latest)
    text = (f"{count:,} prediction{'s' if count != 1 else ''} of {len(latest):,} order"
            f"{'s' if len(latest) != 1 else ''}" + (f" written to {out}" if out else "") + ": "
            + (", ".join(f"{name} {n:,}" for name, n in classes.most_common()) or "none"))
    reasons = Counter((r.get("revision_reason") or "").split(":")[0] for r in latest
                      if r.get("revision", 1) > 1)
    expired = sum(1 for r in latest if r.get("reference_wait_expired"))
    if reasons["late_reference"]:
        text += (f"; {reasons['late_reference']:,} corrected after late reference events "
                 "(revision > 1)")
    if reasons["order_again"]:
        text += (f"; {reasons['order_again']:,} scored again (the same order_id published "
                 "again: revision > 1, revision_reason order_again)")
    if expired:
        text += (f"; {expired:,} flagged reference_wait_expired (scored before every reference "
                 "stream had passed the order's time)")
    return text


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from triage.demo import DemoError, DemoInterrupted, run_demo

    try:
        summary = run_demo(settings, data_dir=args.data, model_dir=args.model,
                           results_dir=args.results)
    except DemoInterrupted as exc:
        print(exc, file=sys.stderr)
        return EXIT_INTERRUPTED
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(summary.report())
    return 0 if summary.agreement == 1.0 else EXIT_FAILED


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from triage.consumer import deadletter_topic as dlq

    if args.action == "inspect":
        print(dlq.inspect(settings, samples_per_reason=args.samples, idle_s=args.idle))
        return 0
    summary = dlq.replay(settings, reason=args.reason, idle_s=args.idle)
    print(summary)
    return EXIT_FAILED if summary.failed else 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from triage.bench.report import render
    from triage.bench.runner import BenchError, BenchOptions, run_benchmark

    try:
        sweep = tuple(int(size) for size in args.sweep.split(",") if size.strip())
    except ValueError:
        raise SettingsError(f"--sweep takes comma-separated batch sizes, got {args.sweep!r}"
                            ) from None
    options = BenchOptions(
        orders=args.orders, partitions=args.partitions, rate=args.rate,
        latency_seconds=args.latency_seconds, latency_partitions=args.latency_partitions,
        saturation_orders=args.saturation_orders,
        scaling_workers=args.scaling_workers, sweep=sweep, sweep_orders=args.sweep_orders,
        restore_records=args.restore_records, models=args.models,
        per_message_orders=args.per_message_orders, http=args.http, timing=args.timing,
        backtest=args.backtest, backtest_orders=args.backtest_orders, broker=args.bench_broker,
        profile=args.profile, ab_module=args.ab_module, ab_pairs=args.ab_pairs,
        windows=args.windows,
        data_dir=args.data, model_dir=args.model, out_dir=args.out,
        keep_topics=args.keep_topics, scorer_module=args.scorer_module)
    try:
        results = run_benchmark(settings, options)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    for env, default, doc in settings_rows():
        print(f"{env}={default}\n    {doc}")
    return 0


COMMANDS = {
    "broker": cmd_broker, "topics": cmd_topics, "datagen": cmd_datagen, "train": cmd_train,
    "replay": cmd_replay, "produce": cmd_produce, "consume": cmd_consume,
    "worker": cmd_worker, "windows": cmd_windows, "models": cmd_models,
    "predictions": cmd_predictions, "demo": cmd_demo, "dlq": cmd_dlq, "lag": cmd_lag,
    "settings": cmd_settings, "serve": cmd_serve,
    "bench": cmd_bench,
    "drift": cmd_drift,
}


def refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   unknown: list[str]) -> None:
    """Exit 2 with the usage of the (sub)command given, not the top level's, and the closest
    flag it has for each unknown one (``--wokers``: did you mean ``--workers``?)."""
    import difflib

    command = parser
    while True:  # down to the subcommand that was chosen (triage drift monitor, ...)
        subparsers = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or getattr(args, subparsers[0].dest, None) is None:
            break
        command = subparsers[0].choices[getattr(args, subparsers[0].dest)]
    flags = [flag for action in command._actions for flag in action.option_strings]
    hints = []
    for word in unknown:
        close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
        if word.startswith("-") and close:
            hints.append(f"{word}: did you mean {close[0]}?")
    command.error(f"unrecognized arguments: {' '.join(unknown)}"
                  + ("".join(f"\n  {hint}" for hint in hints)))


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status: 0, 1 (infrastructure, or a bug: its traceback
    goes to the log), 2 (configuration: settings, files or data to fix; bus/errors.py) or 130
    (Ctrl-C or SIGTERM; bus/interrupt.py)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown(parser, args, unknown)
    try:
        settings = _settings(args)
        configure_logging(settings.log_format, settings.log_level)
        return COMMANDS[args.command](args, settings)
    except KeyboardInterrupt:
        print(f"interrupted: triage {args.command} stopped before it finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KafkaException as exc:
        print(f"error: Kafka: {exc.args[0].str() if exc.args else exc}", file=sys.stderr)
        return exit_status(exc)
    except Exception as exc:
        if isinstance(exc, SystemError) and isinstance(exc.__context__, KeyboardInterrupt):
            # A Ctrl-C that reached Python inside a librdkafka call surfaces as "returned NULL
            # without setting an exception". Long commands turn Ctrl-C into a flag
            # (bus/interrupt.py); this covers the short ones.
            print(f"interrupted: triage {args.command} stopped before it finished",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        if not is_expected(exc):  # a bug: the traceback goes to the log, a person gets a line
            import structlog

            structlog.get_logger("triage").exception("unexpected_error", command=args.command)
            print(f"error: unexpected {type(exc).__name__}: {exc} (a bug in triage; the "
                  "traceback is in the log above)", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
