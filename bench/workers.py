"""The two comparison configurations of ``triage bench``, as worker processes like the scorer.

``python -m triage.bench.workers passthrough``: consume the raw order bytes and produce them,
untouched, to the predictions topic, with the scorer's batching and commit policy and no
decoding. What Kafka and librdkafka cost on their own: the ceiling for any scorer. With
``--source-header`` it also names each record's source (partition, offset, producer timestamp)
in a header, so the latency phase can time the broker and client path alone; the throughput runs
go without it.

``python -m triage.bench.workers floor --model DIR --reference DIR``: what any scorer of this job
pays per order at the least (issue 26's floor): every order decoded and a prediction encoded with
triage's own codecs, one predict call per batch over a design matrix of the batch's size, in the
same loop. No validation, features, sampling, metrics or lineage checks: the scorer's CPU per
order over this one's is what triage adds.

``python -m triage.bench.workers per-message --model DIR --reference DIR``: what the earlier HTTP
services did for every request: decode one order, build a one-row DataFrame, predict, produce
its prediction. It consumes and commits in batches like the scorer, so the comparison isolates
scoring one order at a time (a per-request service would pay more: a commit per order).

Both run as separate processes in the scorer's own Kafka loop (:class:`BatchLoop`: the same
batching, commits after acknowledgement and status file) with the same ``TRIAGE_*`` environment, so
the configurations differ only in what they do with a batch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from confluent_kafka import Message

from triage.bus.deadletter import headers_dict
from triage.consumer.loop import BatchLoop, Handler, Output
from triage.consumer.settings import WorkerSettings

SOURCE_HEADER = "triage.bench.source"


def header_source(headers: Sequence[tuple[str, str | bytes | None]] | Mapping[
        str, str | bytes | None] | None) -> tuple[int, int, int] | None:
    """(partition, offset, producer timestamp in ms) from a passthrough record's headers."""
    value = headers_dict(headers).get(SOURCE_HEADER)
    if value is None:
        return None
    partition, offset, published_at = value.split(":")
    return int(partition), int(offset), int(published_at)


def passthrough(settings: WorkerSettings, source_header: bool = False) -> Handler:
    """(a): the raw bytes, keyed as they came, to the output topic. No decoding at all."""
    topic = settings.topics.predictions_topic

    def handle(batch: list[Message]) -> list[Output]:
        return [Output(topic, msg.key(), msg.value()) for msg in batch]

    def handle_with_source(batch: list[Message]) -> list[Output]:
        return [Output(topic, msg.key(), msg.value(), [(SOURCE_HEADER, (
            f"{msg.partition()}:{msg.offset()}:{msg.timestamp()[1]}").encode())])
            for msg in batch]

    return handle_with_source if source_header else handle


def floor(settings: WorkerSettings, model_dir: Path, reference_dir: Path) -> Handler:
    """(f): decode each order, one predict call per batch, encode a prediction per order.

    The design matrix is zeros of the model's width (a tree ensemble walks as many nodes
    whatever the values); the prediction records carry the batch's probabilities and every
    field the scorer's do, with one features record (the first order's, computed once) for
    all, so that the bytes encoded and produced are the scorer's size."""
    import numpy as np

    from triage.model import artifact
    from triage.model.orders import OrderColumns
    from triage.model.reference import ReferenceTables
    from triage.schemas.codec import codec_for

    model = artifact.load(model_dir)
    reference = ReferenceTables.load(reference_dir)
    classes = [str(c) for c in model.classes]
    width = len(model.columns.names)
    decode = codec_for(settings.connection, "order", settings.topics.orders_topic).decode
    encode = codec_for(settings.connection, "prediction",
                       settings.topics.predictions_topic).encode
    topic = settings.topics.predictions_topic
    version = model.version
    features: list[dict[str, object]] = []  # the first order's, once

    def handle(batch: list[Message]) -> list[Output]:
        if not batch:
            return []
        orders = [decode(msg.value()) for msg in batch]
        if not features:
            features.append(OrderColumns.from_records(orders[:1]).features(reference)
                            .records()[0])
        proba = model.predict_matrix(np.zeros((len(batch), width), dtype=np.float32))
        best = proba.argmax(axis=1).tolist()
        scored_at = int(time.time() * 1000)
        out = []
        for msg, order, row, top in zip(batch, orders, proba.tolist(), best, strict=True):
            out.append(Output(topic, msg.key(), encode({
                "order_id": order["order_id"], "customer_id": order["customer_id"],
                "recommendation": classes[top],
                "probabilities": dict(zip(classes, row, strict=True)),
                "model_version": version, "features": features[0],
                "order_timestamp_ms": order["timestamp_ms"], "scored_at_ms": scored_at,
                "order_published_at_ms": msg.timestamp()[1],
                "order_partition": msg.partition(), "order_offset": msg.offset(),
                "reference_wait_expired": False, "revision": 1, "revision_reason": None,
                "sku_code": order["sku_code"], "zip_code": order["zip_code"]})))
        return out

    return handle


def per_message(settings: WorkerSettings, model_dir: Path, reference_dir: Path) -> Handler:
    """(c): one order at a time through a one-row DataFrame, as the seed services scored."""
    import numpy as np
    import pandas as pd
    from xgboost import XGBClassifier

    from triage.model import artifact
    from triage.model.orders import OrderColumns
    from triage.model.reference import ReferenceTables
    from triage.schemas.codec import codec_for

    model = artifact.load(model_dir)
    # As the earlier services did: scikit-learn's estimator around the booster, per message.
    classifier = XGBClassifier(n_jobs=1)
    classifier.load_model(Path(model_dir) / model.manifest["model_file"])
    reference = ReferenceTables.load(reference_dir)
    columns = model.columns.names
    classes = [str(c) for c in model.classes]
    orders = codec_for(settings.connection, "order", settings.topics.orders_topic)
    predictions = codec_for(settings.connection, "prediction", settings.topics.predictions_topic)
    topic = settings.topics.predictions_topic

    def score(msg: Message) -> bytes:
        order = orders.decode(msg.value())
        features = OrderColumns.from_records([order]).features(reference)
        row = pd.DataFrame(model.design_matrix(features), columns=columns)
        proba = classifier.predict_proba(row)[0]
        proba = proba.astype(np.float32).tolist()
        return predictions.encode({
            "order_id": order["order_id"],
            "customer_id": order["customer_id"],
            "recommendation": classes[int(np.argmax(proba))],
            "probabilities": dict(zip(classes, proba, strict=True)),
            "model_version": model.version,
            "features": features.records()[0],
            "order_timestamp_ms": order["timestamp_ms"],
            "scored_at_ms": int(time.time() * 1000),
            "order_published_at_ms": msg.timestamp()[1],
            "order_partition": msg.partition(),
            "order_offset": msg.offset(),
        })

    def handle(batch: list[Message]) -> list[Output]:
        return [Output(topic, msg.key(), score(msg)) for msg in batch]

    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="triage.bench.workers")
    parser.add_argument("mode", choices=["passthrough", "floor", "per-message"])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--status-file", type=Path)
    parser.add_argument("--source-header", action="store_true",
                        help=f"passthrough: add a {SOURCE_HEADER} header (partition:offset:"
                             "published_at_ms) to every record, for the latency figure")
    args = parser.parse_args(argv)
    if args.mode != "passthrough" and not (args.model and args.reference):
        parser.error(f"{args.mode} needs --model and --reference")
    settings = WorkerSettings.from_env()
    loop = BatchLoop(settings.connection, settings.scorer, settings.topics.orders_topic,
                     status_file=args.status_file)
    handle = (passthrough(settings, args.source_header) if args.mode == "passthrough"
              else floor(settings, args.model, args.reference) if args.mode == "floor"
              else per_message(settings, args.model, args.reference))

    def stop(signum: int, _frame: object) -> None:
        loop.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop.run(handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
