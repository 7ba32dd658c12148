"""``triage demo``: the whole path once, on the embedded broker unless one is configured.

Generate 20k orders (or use --data), train (unless the model exists), start the broker and
create the topics, run 2 workers with no reference data of their own, replay the data
directory (orders and the three reference streams, merged in event time), wait until every
published order has a prediction or a dead letter (and the corrected revisions that follow
have come), compare each order's last revision with offline batch scoring of the same orders
over the complete CSVs (merge_asof's features), report, write results/predictions.jsonl (the
last revision of each order), shut down. The workers learn stock, payments and zip roll-outs only
from the reference topics, as they would from a live store (scoring/feed.py).

Every record ends as exactly one of the two, so the demo waits for either: a bad row (an empty
or malformed ``order_id``) is dead-lettered by the workers and reported by reason; a row that
cannot become an order at all (a timestamp that does not parse) is skipped by the replay and
reported by line. Only a file that cannot be read at all is refused whole.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from triage.bus.clients import create_topics, make_admin, partitions_of
from triage.bus.embedded import EmbeddedBroker, running_embedded
from triage.bus.errors import InfrastructureError
from triage.bus.interrupt import Interrupt
from triage.consumer.reader import collect_outcomes
from triage.consumer.supervisor import Supervisor
from triage.model import artifact
from triage.model.datagen import CSV_FILES, generate
from triage.model.orders import SkippedRow, read_orders_csv
from triage.model.reference import ReferenceDataError, ReferenceTables, zip_code_warnings
from triage.model.streams import reference_topic_partitions
from triage.model.train import train
from triage.producer.replay import replay
from triage.settings import Settings

DEMO_ORDERS = 20_000
DEMO_SEED = 7
DEMO_WORKERS = 2
STALL_S = 60.0  # give up when no prediction or dead letter arrived for this long


class DemoError(InfrastructureError):
    """The demo could not run to the end (a delivery failed, the workers stalled)."""


class DemoInterrupted(DemoError):
    """Ctrl-C (or SIGTERM) while the demo's broker and workers ran: they are stopped, and the
    message says how far the demo got."""


@dataclass(frozen=True)
class DemoSummary:
    orders: int                      # rows of orders.csv published
    counts: dict[str, int]           # predictions by recommendation
    agreement: float                 # of the predicted orders' last revisions, share equal to
    disagreements: list[str]         # offline scoring, and the orders that differ
    corrected: int                   # orders whose first prediction a later revision replaced
    first_agreement: float           # the same share for the first predictions
    silently_wrong: int              # first predictions that differ, with no flag and no
    #                                  correction after them: what must never happen
    throughput: float
    latency_ms: dict[str, float]
    duplicates: int
    broker: str
    model_version: str
    output: Path
    dead_letters: dict[str, int] = field(default_factory=dict)  # reason -> records
    expired: int = 0  # scored before every reference stream had passed them
    skipped: tuple[SkippedRow, ...] = ()

    @property
    def predicted(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        lines = [
            "",
            f"triage demo: {self.orders} orders published, {self.predicted} scored by model "
            f"{self.model_version} on {self.broker}",
            "",
            "recommendation          orders",
        ]
        for name, count in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<22}{count:>6}  ({count / max(self.predicted, 1):.1%})")
        if self.dead_letters:
            lines += ["", f"dead-lettered (not scored; `triage dlq inspect` shows them): "
                          f"{sum(self.dead_letters.values())}"]
            lines += [f"  {reason:<22}{count:>6}"
                      for reason, count in sorted(self.dead_letters.items())]
        if self.skipped:
            lines += ["", f"rows of orders.csv skipped, not orders: {len(self.skipped)}"]
            lines += [f"  {row}" for row in self.skipped[:5]]
        lines += [
            "",
            f"agreement with offline batch scoring: {self.agreement:.2%}"
            + (f"  (differs: {', '.join(self.disagreements[:5])})" if self.disagreements else ""),
            f"corrected after a late reference event (revision 2 and up): {self.corrected}; "
            f"first predictions agreeing: {self.first_agreement:.2%}; wrong without a flag or "
            f"a correction: {self.silently_wrong}",
            f"throughput (first order published to last prediction): "
            f"{self.throughput:,.0f} orders/s",
            "end-to-end latency at saturation (order published -> prediction produced; "
            "includes the replayed backlog's queueing): "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in self.latency_ms.items()),
            f"duplicate predictions: {self.duplicates}",
            f"scored before the reference streams had passed them (max wait ran out): "
            f"{self.expired}",
            f"predictions written to {self.output}",
        ]
        return "\n".join(lines)


def _ensure_data(data_dir: Path | None) -> Path:
    if data_dir is not None:
        missing = [name for name in CSV_FILES if not (data_dir / name).is_file()]
        if missing:
            raise ReferenceDataError(f"--data {data_dir} lacks {', '.join(missing)}")
        return data_dir
    data_dir = Path("data/demo")
    if not all((data_dir / name).is_file() for name in CSV_FILES):
        print(f"generating {DEMO_ORDERS} orders into {data_dir}", flush=True)
        generate(DEMO_ORDERS, DEMO_SEED, data_dir)
    return data_dir


def _ensure_model(model_dir: Path, data_dir: Path, encoding: str) -> None:
    """Train a model on ``data_dir`` into ``model_dir`` unless one is there. One that is there
    is used as it is (a model directory is never overwritten); when its manifest says it was
    trained on other CSVs than ``data_dir``'s, a line says so and how to get one trained on
    them."""
    if (model_dir / artifact.MANIFEST).is_file():
        training = artifact.read_manifest(model_dir).get("training", {})
        trained_on = training.get("data_sha256", {})
        if trained_on and any(not (data_dir / name).is_file()
                              or artifact.sha256_of(data_dir / name) != digest
                              for name, digest in trained_on.items()):
            print(f"note: using the model in {model_dir}, trained on "
                  f"{training.get('data_dir', 'other data')}, not on {data_dir}; "
                  f"--model DIR trains one on {data_dir} into DIR", flush=True)
        else:
            print(f"using the model in {model_dir}", flush=True)
        return
    print(f"training a model on {data_dir} into {model_dir}", flush=True)
    report = train(data_dir, model_dir, encoding=encoding)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    print(f"holdout accuracy {report.holdout_accuracy:.4%}\n{report.confusion_table()}",
          flush=True)


def run_demo(settings: Settings, *, data_dir: Path | None, model_dir: Path,
             results_dir: Path) -> DemoSummary:
    """Run the demo; raises DemoError, or ReferenceDataError for data that cannot be read."""
    data_dir = _ensure_data(data_dir)
    _ensure_model(model_dir, data_dir, settings.data.csv_encoding)
    model = artifact.load(model_dir)
    reference = ReferenceTables.load(data_dir, encoding=settings.data.csv_encoding)
    orders = read_orders_csv(data_dir / "orders.csv", encoding=settings.data.csv_encoding)
    for warning in zip_code_warnings(reference.keys("zip_codes"), orders.zip_code):
        print(f"warning: {warning}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        # From here on a Ctrl-C is a request (bus/interrupt.py): the replay stops between two
        # records, the wait for predictions between two polls, and the stack stops the workers
        # and the broker. Before, it stops the data generation or the training at once.
        stop = stack.enter_context(Interrupt())
        connection = settings.connection
        bootstrap = connection.bootstrap_servers or running_embedded(connection.state_dir)
        if not bootstrap:
            print("starting the embedded broker (tansu)", flush=True)
            bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
        settings = settings.replace(bootstrap_servers=bootstrap)
        for name, outcome in create_topics(settings.connection, settings.topics,
                                           reference_topic_partitions(settings.topics)).items():
            print(f"topic {name}: {outcome}", flush=True)

        supervisor = Supervisor(settings, model_dir.resolve(), None, DEMO_WORKERS)
        supervisor.start()
        stack.callback(supervisor.stop)
        supervisor.wait_until_assigned(
            len(partitions_of(make_admin(settings.connection), settings.topics.orders_topic)),
            stop=lambda: stop.requested)
        if stop.requested:
            raise DemoInterrupted(f"interrupted ({stop.signal_name}) while the workers joined "
                                  "the group; they and the broker the demo started are stopped")

        started_ms = int(time.time() * 1000)
        print(f"replaying {len(orders)} orders and their reference streams through "
              f"{DEMO_WORKERS} workers", flush=True)
        replayed = replay(settings, data_dir, track=True, stop=stop)
        if replayed.interrupted:
            raise DemoInterrupted(
                f"interrupted ({replayed.interrupted}) while replaying: {replayed.sent:,} "
                f"records published of {len(orders):,} orders and their reference streams; "
                "the workers and the broker the demo started are stopped")
        if replayed.failed:
            raise DemoError(f"replay failed: {replayed}")
        positions = [where for where in replayed.positions if where is not None]
        if len(positions) != len(orders):
            raise DemoError(f"{len(orders) - len(positions)} orders were not acknowledged")
        with tqdm(total=len(positions), unit="order", desc="scored or dead-lettered",
                  disable=not sys.stderr.isatty()) as bar:
            # Then wait out the lateness allowance and a second for corrected revisions.
            outcomes = collect_outcomes(
                settings.connection, settings.topics, set(positions), since_ms=started_ms,
                stall_s=STALL_S, progress=bar.update,
                settle_s=settings.reference.reference_lateness_ms / 1000.0 + 1.0,
                stop=lambda: stop.requested)
        if stop.requested:
            raise DemoInterrupted(
                f"interrupted ({stop.signal_name}) while waiting for predictions: "
                f"{len(outcomes.settled() & set(positions)):,} of {len(positions):,} orders "
                "scored or dead-lettered; the workers and the broker the demo started are "
                "stopped")

    expected, expected_proba = model.predict(orders.features(reference))
    first: dict[int, dict[str, Any]] = {}  # row of orders.csv -> its first prediction
    last: dict[int, dict[str, Any]] = {}   # row of orders.csv -> its highest revision
    disagreements, first_disagreements, silently_wrong = [], 0, 0

    def differs(record: dict[str, Any], row: int) -> bool:
        return bool(record["recommendation"] != expected[row] or [
            record["probabilities"][c] for c in model.classes] != expected_proba[row].tolist())

    for row, where in enumerate(positions):
        if where not in outcomes.predictions:
            continue
        first[row] = outcomes.predictions[where][0]
        last[row] = outcomes.latest(where)
        first_disagreements += differs(first[row], row)
        silently_wrong += differs(first[row], row) and last[row]["revision"] == 1 \
            and not first[row]["reference_wait_expired"]
        if differs(last[row], row):
            disagreements.append(orders.order_id[row])
    scored = list(first.values())
    latencies = np.array([r["scored_at_ms"] - r["order_published_at_ms"] for r in scored])
    span_s = (max(r["scored_at_ms"] for r in scored)
              - min(r["order_published_at_ms"] for r in scored)) / 1000.0 if scored else 0.0

    results_dir.mkdir(parents=True, exist_ok=True)
    output = results_dir / "predictions.jsonl"
    with open(output, "w") as out:
        for row in sorted(last):
            out.write(json.dumps(last[row]) + "\n")
    return DemoSummary(
        orders=len(positions),
        counts=dict(Counter(r["recommendation"] for r in last.values())),
        agreement=1.0 - len(disagreements) / len(scored) if scored else 1.0,
        disagreements=disagreements,
        corrected=sum(r["revision"] > 1 for r in last.values()),
        first_agreement=1.0 - first_disagreements / len(scored) if scored else 1.0,
        silently_wrong=silently_wrong,
        throughput=len(scored) / span_s if span_s > 0 else float("nan"),
        latency_ms={f"p{q}": float(np.percentile(latencies, q)) if len(latencies) else 0.0
                    for q in (50, 95, 99)},
        duplicates=sum(len(records) - len({r["revision"] for r in records})
                       for records in outcomes.predictions.values()),
        expired=sum(1 for r in scored if r["reference_wait_expired"]),
        broker=bootstrap,
        model_version=model.version,
        output=output,
        dead_letters=dict(Counter(outcomes.dead_letters.values())),
        skipped=replayed.skipped,
    )
