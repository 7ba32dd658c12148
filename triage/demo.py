"""``triage demo``: the whole path once, on the embedded broker unless one is configured.

Generate 20k orders (or use --data), train (unless the model exists), start the broker and
create the topics, run 2 workers, replay, wait for every prediction, compare each with offline
batch scoring of the same orders, report, write results/predictions.jsonl, shut down.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bus.clients import create_topics, make_admin, partitions_of
from bus.embedded import EmbeddedBroker, running_embedded
from bus.settings import Settings
from consumer.reader import collect
from consumer.supervisor import Supervisor
from model import artifact
from model.datagen import CSV_FILES, generate
from model.orders import read_orders_csv
from model.reference import ReferenceTables
from model.train import train
from producer.replay import replay

DEMO_ORDERS = 20_000
DEMO_SEED = 7
DEMO_WORKERS = 2
WAIT_FOR_PREDICTIONS_S = 90.0


@dataclass(frozen=True)
class DemoSummary:
    orders: int
    counts: dict[str, int]
    agreement: float
    disagreements: list[str]
    throughput: float
    latency_ms: dict[str, float]
    duplicates: int
    broker: str
    model_version: str
    output: Path

    def report(self) -> str:
        lines = [
            "",
            f"triage demo: {self.orders} orders scored by model {self.model_version} "
            f"on {self.broker}",
            "",
            "recommendation          orders",
        ]
        for name, count in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<22}{count:>6}  ({count / self.orders:.1%})")
        lines += [
            "",
            f"agreement with offline batch scoring: {self.agreement:.2%}"
            + (f"  (differs: {', '.join(self.disagreements[:5])})" if self.disagreements else ""),
            f"throughput (first order published to last prediction): "
            f"{self.throughput:,.0f} orders/s",
            "end-to-end latency at saturation (order published -> prediction produced; "
            "includes the replayed backlog's queueing): "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in self.latency_ms.items()),
            f"duplicate predictions: {self.duplicates}",
            f"predictions written to {self.output}",
        ]
        return "\n".join(lines)


def _ensure_data(data_dir: Path | None) -> Path:
    if data_dir is not None:
        missing = [name for name in CSV_FILES if not (data_dir / name).is_file()]
        if missing:
            raise ValueError(f"--data {data_dir} lacks {', '.join(missing)}")
        return data_dir
    data_dir = Path("data/demo")
    if not all((data_dir / name).is_file() for name in CSV_FILES):
        print(f"generating {DEMO_ORDERS} orders into {data_dir}", flush=True)
        generate(DEMO_ORDERS, DEMO_SEED, data_dir)
    return data_dir


def _ensure_model(model_dir: Path, data_dir: Path) -> None:
    if (model_dir / artifact.MANIFEST).is_file():
        return
    print(f"training a model on {data_dir} into {model_dir}", flush=True)
    report = train(data_dir, model_dir)
    print(f"holdout accuracy {report.holdout_accuracy:.4%}\n{report.confusion_table()}",
          flush=True)


def run_demo(settings: Settings, *, data_dir: Path | None, model_dir: Path,
             results_dir: Path) -> DemoSummary:
    data_dir = _ensure_data(data_dir)
    _ensure_model(model_dir, data_dir)
    model = artifact.load(model_dir)
    reference = ReferenceTables.load(data_dir)
    orders = read_orders_csv(data_dir / "orders.csv")

    with contextlib.ExitStack() as stack:
        bootstrap = settings.bootstrap_servers or running_embedded(settings.state_dir)
        if not bootstrap:
            print("starting the embedded broker (tansu)", flush=True)
            bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
        settings = settings.replace(bootstrap_servers=bootstrap)
        for name, outcome in create_topics(settings).items():
            print(f"topic {name}: {outcome}", flush=True)

        supervisor = Supervisor(settings, model_dir.resolve(), data_dir.resolve(), DEMO_WORKERS)
        supervisor.start()
        stack.callback(supervisor.stop)
        supervisor.wait_until_assigned(
            len(partitions_of(make_admin(settings), settings.orders_topic)))

        started_ms = int(time.time() * 1000)
        print(f"replaying {len(orders)} orders through {DEMO_WORKERS} workers", flush=True)
        summary = replay(settings, data_dir / "orders.csv")
        if summary.failed:
            raise RuntimeError(f"replay failed: {summary}")
        found = collect(settings, settings.predictions_topic, "prediction",
                        set(orders.order_id), timeout_s=WAIT_FOR_PREDICTIONS_S,
                        since_ms=started_ms)

    expected, expected_proba = model.predict(orders.features(reference))
    first = {order_id: records[0] for order_id, records in found.items()}
    disagreements = [
        order_id for order_id, rec, proba in zip(orders.order_id, expected.tolist(),
                                                 expected_proba.tolist(), strict=True)
        if first[order_id]["recommendation"] != rec
        or [first[order_id]["probabilities"][c] for c in model.classes] != proba
    ]
    latencies = np.array([r["scored_at_ms"] - r["order_published_at_ms"] for r in first.values()])
    span_s = (max(r["scored_at_ms"] for r in first.values())
              - min(r["order_published_at_ms"] for r in first.values())) / 1000.0

    results_dir.mkdir(parents=True, exist_ok=True)
    output = results_dir / "predictions.jsonl"
    with open(output, "w") as out:
        for order_id in orders.order_id:
            out.write(json.dumps(first[order_id]) + "\n")
    return DemoSummary(
        orders=len(orders),
        counts=dict(Counter(r["recommendation"] for r in first.values())),
        agreement=1.0 - len(disagreements) / len(orders),
        disagreements=disagreements,
        throughput=len(orders) / span_s if span_s > 0 else float("nan"),
        latency_ms={f"p{q}": float(np.percentile(latencies, q)) for q in (50, 95, 99)},
        duplicates=sum(len(records) - 1 for records in found.values()),
        broker=bootstrap,
        model_version=model.version,
        output=output,
    )
