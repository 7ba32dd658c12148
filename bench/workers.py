"""The two comparison configurations of ``triage bench``, as worker processes like the scorer.

``python -m triage.bench.workers passthrough``: consume the raw order bytes and produce them,
untouched, to the predictions topic, with the scorer's batching and commit policy and no
decoding. What Kafka and librdkafka cost on their own: the ceiling for any scorer. With
``--source-header`` it also names each record's source (partition, offset, producer timestamp)
in a header, so the latency phase can time the broker and client path alone; the throughput runs
go without it.

``python -m triage.bench.workers per-message --model DIR --reference DIR``: what the earlier HTTP
services did for every request: decode one order, build a one-row DataFrame, predict, produce
its prediction. It consumes and commits in batches like the scorer, so the comparison isolates
scoring one order at a time (a per-request service would pay more: a commit per order).

Both run as separate processes with the scorer's client configuration and settings (the same
``TRIAGE_*`` environment), and write the same status file as the scorer on assignment, so the
benchmark measures all three the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from triage.bus.clients import make_consumer, make_producer
from triage.bus.errors import InfrastructureError
from triage.bus.settings import Settings

_FLUSH_TIMEOUT_S = 60.0


class BatchLoop:
    """consume(batch_size, timeout) -> handle -> wait for every delivery -> commit, until SIGTERM.

    The scorer's policy (consumer/scorer.py) without its scoring, so that the figures differ
    only by what a configuration does with each batch.
    """

    def __init__(self, settings: Settings, status_file: Path | None) -> None:
        self.settings = settings
        self.status_file = status_file
        self.consumer = make_consumer(settings)
        self.producer = make_producer(settings)
        self.assigned: set[int] = set()
        self.stop_requested = False
        self.delivery_errors: list[str] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers,
                                      on_delivery=self._on_delivery)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                self.producer.poll(0.05)

    def run(self, handle: Callable[[list[Message]], None]) -> None:
        self.consumer.subscribe([self.settings.orders_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        timeout_s = self.settings.batch_timeout_ms / 1000.0
        try:
            while not self.stop_requested:
                batch = self.consumer.consume(1, timeout_s)  # the scorer's batching
                if batch and self.settings.batch_size > 1:
                    batch += self.consumer.consume(self.settings.batch_size - 1, 0)
                if not batch:
                    continue
                records = []
                for msg in batch:
                    err = msg.error()
                    if err is None:
                        records.append(msg)
                    elif err.fatal() or err.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(err)
                handle(records)
                remaining = self.producer.flush(_FLUSH_TIMEOUT_S)
                if remaining or self.delivery_errors:
                    raise InfrastructureError(f"{remaining} not acknowledged; refused: "
                                       f"{self.delivery_errors[:3]}")
                self._commit(records)
        finally:
            self.consumer.close()
            self.producer.flush(_FLUSH_TIMEOUT_S)

    def _commit(self, consumed: list[Message]) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        for msg in consumed:
            key = (msg.topic(), msg.partition())
            next_offsets[key] = max(next_offsets.get(key, 0), msg.offset() + 1)
        if next_offsets:
            self.consumer.commit(offsets=[TopicPartition(t, p, o)
                                          for (t, p), o in next_offsets.items()],
                                 asynchronous=False)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.delivery_errors.append(err.str())

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned |= {p.partition for p in partitions}
        self._write_status()

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned -= {p.partition for p in partitions}
        self._write_status()

    def _write_status(self) -> None:
        """The scorer's status-file format: the benchmark times every configuration from it."""
        if self.status_file is None:
            return
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "worker": "0",
                                   "partitions": sorted(self.assigned)}))
        tmp.replace(self.status_file)


SOURCE_HEADER = "triage.bench.source"


def source_of(headers: list[tuple[str, bytes]] | None) -> tuple[int, int, int] | None:
    """(partition, offset, producer timestamp in ms) from a passthrough record's headers."""
    for name, value in headers or ():
        if name == SOURCE_HEADER:
            partition, offset, published_at = value.decode().split(":")
            return int(partition), int(offset), int(published_at)
    return None


def passthrough(loop: BatchLoop, source_header: bool = False) -> Callable[[list[Message]], None]:
    """(a): the raw bytes, keyed as they came, to the output topic. No decoding at all."""
    topic, produce = loop.settings.predictions_topic, loop.produce

    def handle(batch: list[Message]) -> None:
        for msg in batch:
            produce(topic, msg.key(), msg.value())

    def handle_with_source(batch: list[Message]) -> None:
        for msg in batch:
            source = f"{msg.partition()}:{msg.offset()}:{msg.timestamp()[1]}".encode()
            produce(topic, msg.key(), msg.value(), [(SOURCE_HEADER, source)])

    return handle_with_source if source_header else handle


def per_message(loop: BatchLoop, model_dir: Path,
                reference_dir: Path) -> Callable[[list[Message]], None]:
    """(c): one order at a time through a one-row DataFrame, as the seed services scored."""
    import numpy as np
    import pandas as pd

    from triage.model import artifact
    from triage.model.orders import OrderColumns
    from triage.model.reference import ReferenceTables
    from triage.schemas.codec import codec_for

    settings = loop.settings
    model = artifact.load(model_dir)
    reference = ReferenceTables.load(reference_dir)
    columns = model.columns.names
    classes = [str(c) for c in model.classes]
    orders = codec_for(settings, "order", settings.orders_topic)
    predictions = codec_for(settings, "prediction", settings.predictions_topic)
    topic = settings.predictions_topic

    def score(msg: Message) -> bytes:
        order = orders.decode(msg.value())
        features = OrderColumns.from_records([order]).features(reference)
        status = str(features.payment_status[0])
        inventory = float(features.inventory[0])
        row = pd.DataFrame(model.design_matrix(features), columns=columns)
        proba = model.classifier.predict_proba(row)[0]
        proba = proba.astype(np.float32).tolist()
        return predictions.encode({
            "order_id": order["order_id"],
            "customer_id": order["customer_id"],
            "recommendation": classes[int(np.argmax(proba))],
            "probabilities": dict(zip(classes, proba, strict=True)),
            "model_version": model.version,
            "features": {"order_hour_of_day": int(features.order_hour_of_day[0]),
                         "inventory": None if inventory != inventory else inventory,
                         "payment_status": status,
                         "zip_code_available": bool(features.zip_code_available[0])},
            "order_timestamp_ms": order["timestamp_ms"],
            "scored_at_ms": int(time.time() * 1000),
            "order_published_at_ms": msg.timestamp()[1],
            "order_partition": msg.partition(),
            "order_offset": msg.offset(),
        })

    def handle(batch: list[Message]) -> None:
        for msg in batch:
            loop.produce(topic, msg.key(), score(msg))

    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triage.bench.workers")
    parser.add_argument("mode", choices=["passthrough", "per-message"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--status-file", type=Path)
    parser.add_argument("--source-header", action="store_true",
                        help=f"passthrough: add a {SOURCE_HEADER} header (partition:offset:"
                             "published_at_ms) to every record, for the latency figure")
    args = parser.parse_args(argv)
    if args.mode == "per-message" and not (args.model and args.reference):
        parser.error("per-message needs --model and --reference")
    loop = BatchLoop(Settings.from_env(), args.status_file)
    handle = (passthrough(loop, args.source_header) if args.mode == "passthrough"
              else per_message(loop, args.model, args.reference))

    def stop(signum: int, _frame: object) -> None:
        loop.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop.run(handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
