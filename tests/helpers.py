"""What the tests share, in one place: no test module imports another. Plain helpers here;
fixtures in tests/conftest.py (both tiers) and tests/integration/conftest.py (the broker's).
Nothing here starts a broker; the helpers of the integration tier take the Settings of one."""

from __future__ import annotations

import contextlib
import csv
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd
import uvicorn

from triage.bus.clients import Source
from triage.bus.embedded import free_port
from triage.consumer.reader import TopicReader, collect
from triage.consumer.supervisor import Supervisor, worker_env
from triage.model import artifact
from triage.model.features import WINDOWED_NAMES
from triage.model.orders import read_orders_csv
from triage.producer.replay import ReplaySummary, replay
from triage.schemas.codec import Codec
from triage.scoring.core import Incoming
from triage.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from triage.bench.timing import Event
    from triage.consumer.scorer import Scorer
    from triage.model.asof import VersionedTable

ROOT = Path(__file__).resolve().parents[1]  # the repository


# --- paths ---------------------------------------------------------------------------------------

# 500 orders of the 2021 exercise's own CSVs and the reference rows they need, cut from
# ../shared/data/exercise-2021 (its README says how)
EXERCISE = ROOT / "tests" / "data" / "exercise-2021"


BROKERS = ROOT / "results" / "brokers"  # for the run's summary


def broker_notes() -> Path:
    """Where the pytest processes of this test run note their brokers: a folder of the run's
    own (TRIAGE_TEST_RUN, set in tests/conftest.py), so that runs at the same time, or a
    person's while CI runs, never print each other's."""
    return BROKERS / os.environ.get("TRIAGE_TEST_RUN", "unknown")


DELIVERY_RESULTS = ROOT / "results" / "delivery"


PROMETHEUS = ROOT / "deploy" / "prometheus"


# --- the command line ----------------------------------------------------------------------------

TRIAGE = [sys.executable, "-m", "triage.cli"]


def clean_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    return {**env, "TRIAGE_STATE_DIR": str(state_dir), "TRIAGE_LOG_FORMAT": "json", **extra}


def triage(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*TRIAGE, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRIAGE, "models", *args], env=worker_env(settings),
                          capture_output=True, text=True, timeout=120)


# --- waiting, HTTP -------------------------------------------------------------------------------

WAIT_S = 60.0  # start-up (imports, model, group join) on a loaded 2-core machine


def get(port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of GET ``path``; (0, error) while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes] | None = None,
             timeout_s: float = WAIT_S) -> None:
    """Poll ``check`` every 50 ms until it holds; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc is None or proc.poll() is None, f"{what}: the worker exited {proc.poll()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.05)


HOLD_S = 20.0  # how long a held batch waits for the test's word before it goes on by itself


class Client:
    """A keep-alive HTTP/1.1 client of one server."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.connection.request(method, path, body=data,
                                headers={"Content-Type": "application/json", **(headers or {})})
        response = self.connection.getresponse()
        payload = response.read()
        kind = response.getheader("Content-Type") or ""
        return response.status, json.loads(payload) if "json" in kind else payload.decode()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[int]:
    """``app`` on uvicorn in a thread, on a free port; yields the port once it listens."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("uvicorn listening", lambda: server.started, timeout_s=30)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


# --- data and the merge_asof oracle --------------------------------------------------------------

LIVE_ORDERS = 1_500  # the orders of the live_data fixture (tests/integration/conftest.py)


def exercise_orders() -> list[dict[str, str]]:
    with open(EXERCISE / "orders.csv", newline="", encoding="utf-8") as f:
        return [{k: row[k] for k in ("order_id", "customer_id", "timestamp", "sku_code",
                                     "zip_code")} for row in csv.DictReader(f)]


def oracle(data_dir: Path) -> pd.DataFrame:
    """The four features computed the slow, obvious way, with pandas."""
    def read(name: str, times: list[str]) -> pd.DataFrame:
        frame = pd.read_csv(data_dir / name, dtype=str, keep_default_na=False)
        for column in times:
            frame[column] = pd.to_datetime(frame[column], format="%Y-%m-%d %H:%M:%S")
        return frame

    orders = read("orders.csv", ["timestamp"]).reset_index(names="row")
    inventory = read("inventory.csv", ["timestamp"])
    inventory["inventory"] = inventory["inventory"].astype(float)
    payments = read("payments.csv", ["timestamp"])
    zips = read("zip_codes.csv", ["available_from"])

    by_time = orders.sort_values("timestamp", kind="stable")
    stock = pd.merge_asof(by_time, inventory.sort_values("timestamp", kind="stable"),
                          on="timestamp", by="sku_code", direction="backward")
    paid = pd.merge_asof(by_time, payments.sort_values("timestamp", kind="stable"),
                         on="timestamp", by="order_id", direction="backward")
    result = orders[["row", "timestamp", "zip_code"]].merge(zips, on="zip_code", how="left")
    result = result.sort_values("row").set_index("row")
    result["order_hour_of_day"] = result["timestamp"].dt.hour
    result["inventory"] = stock.set_index("row")["inventory"]
    result["payment_status"] = paid.set_index("row")["payment_status"].fillna("MISSING")
    result["zip_code_available"] = (result["timestamp"] > result["available_from"]).fillna(False)
    return result


def merge_asof_features(events: list[Event]) -> dict[str, dict]:
    """order_id -> its features: the four by pandas.merge_asof(direction="backward") over every
    reference event, in publication order (of two events of one key and time, the later
    published wins, as the later row in a file does)."""
    def frame(stream: str, columns: dict[str, str]) -> pd.DataFrame:
        rows = [{new: e.record[old] for old, new in columns.items()}
                for e in events if e.stream == stream]
        table = pd.DataFrame(rows, columns=list(columns.values()))
        return table.sort_values("at", kind="stable")

    orders = frame("orders", {"order_id": "order_id", "timestamp_ms": "at", "sku_code": "sku",
                            "zip_code": "zip"})
    stock = frame("inventory", {"sku_code": "sku", "timestamp_ms": "at", "inventory": "level"})
    paid = frame("payments", {"order_id": "order_id", "timestamp_ms": "at",
                            "payment_status": "status"})
    served = frame("zip_codes", {"zip_code": "zip", "available_from_ms": "at"}).assign(
        served=True)
    joined = pd.merge_asof(orders, stock, on="at", by="sku", direction="backward")
    joined = pd.merge_asof(joined, paid, on="at", by="order_id", direction="backward")
    joined = pd.merge_asof(joined, served, on="at", by="zip", direction="backward",
                           allow_exact_matches=False)  # served strictly after available_from
    return {row.order_id: {
        "order_hour_of_day": int(row.at // 3_600_000 % 24),
        "inventory": None if pd.isna(row.level) else float(row.level),
        "payment_status": "MISSING" if pd.isna(row.status) else row.status,
        "zip_code_available": bool(row.served is True),
        **dict.fromkeys(WINDOWED_NAMES)}  # null: the model reads none, so none is joined
        for row in joined.itertuples()}


def write_rows(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> None:
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows(rows)


def small_data(history: Path, out: Path, orders: int) -> list[list[str]]:
    """The reference CSVs of ``history`` and the first ``orders`` rows of its orders.csv."""
    out.mkdir()
    for name in ("inventory.csv", "payments.csv", "zip_codes.csv"):
        shutil.copy(history / name, out / name)
    with open(history / "orders.csv", newline="") as f:
        return [row for _, row in zip(range(orders + 1), csv.reader(f), strict=False)]


def cp1252_copy(history: Path, out: Path) -> Path:
    """history's CSVs, 300 orders, saved as Windows-1252 with a customer and a SKU that
    need it (line 4 of each file)."""
    rows = small_data(history, out, 300)
    rows[3][1] = "C-Müller"
    write_rows(out / "orders.csv", rows, encoding="cp1252")
    with open(history / "inventory.csv", newline="") as f:
        inventory = list(csv.reader(f))
    inventory[3][0] = "SKU-Größe"
    write_rows(out / "inventory.csv", inventory, encoding="cp1252")
    return out


# --- records and artifacts -----------------------------------------------------------------------

CODEC = Codec("order")


def kafka(values: list[bytes | None]) -> list[Incoming]:
    return [Incoming(v, b"k", Source("orders", 0, i, 1_700_000_000_000 + i))
            for i, v in enumerate(values)]


def prediction(order_id: str, label: str, revision: int = 1, expired: bool = False,
               reason: str = "order_again") -> dict[str, object]:
    """A prediction record as a worker publishes it (schemas/prediction.avsc)."""
    return {"order_id": order_id, "customer_id": "C", "recommendation": label,
            "probabilities": {label: 1.0}, "model_version": "m",
            "features": {"order_hour_of_day": 10, "inventory": 3.0, "payment_status": "OK",
                         "zip_code_available": True},
            "order_timestamp_ms": 0, "scored_at_ms": 0, "order_published_at_ms": 0,
            "order_partition": 0, "order_offset": 0, "reference_wait_expired": expired,
            "revision": revision, "revision_reason": None if revision == 1 else reason,
            "sku_code": "S", "zip_code": "1000"}


def tamper(model_dir: Path) -> None:
    """Change one byte of the model file, as a bad copy or an attacker would."""
    model_file = model_dir / artifact.read_manifest(model_dir)["model_file"]
    data = bytearray(model_file.read_bytes())
    data[-2] ^= 0x01
    model_file.write_bytes(bytes(data))


SECRET = "s3cr3t-Pa55-word-never-logged"


class PoisonedInventory:
    """The real inventory table, except that a lookup including the SKU ``POISON`` raises: the
    fault a bug in the feature code would cause."""

    def __init__(self, table: VersionedTable[np.float64]) -> None:
        self.table = table

    def lookup(self, keys: list[str], times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if "POISON" in keys:
            raise FloatingPointError("feature code exploded")
        return self.table.lookup(keys, times)

    def __len__(self) -> int:
        return len(self.table)

    def __getattr__(self, name: str) -> object:  # everything else as the real table
        return getattr(self.table, name)


# --- brokers -------------------------------------------------------------------------------------

APACHE_KAFKA, EMBEDDED, CONFIGURED = "Apache Kafka", "embedded (tansu)", "configured"


class Broker(NamedTuple):
    bootstrap: str
    kind: str                 # APACHE_KAFKA, EMBEDDED or CONFIGURED (TRIAGE_BOOTSTRAP_SERVERS)
    log: Path | None = None   # the broker's log, kept for a failing test


# --- workers on a broker -------------------------------------------------------------------------

SettingsFactory = Callable[[Path], Settings]  # the fresh_settings fixture


def run_scorer(scorer: Scorer, expected: int, timeout_s: float = 180) -> Counter:
    """Run the loop in a thread until ``expected`` records are settled (predicted or
    dead-lettered); then stop it."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            scorer.run()
        except BaseException as exc:  # the test asserts there was none
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while scorer.stats.settled < expected and thread.is_alive():
        assert time.monotonic() < deadline, f"settled only {scorer.stats.as_dict()}"
        thread.join(0.2)
    scorer.request_stop()
    thread.join(60)
    assert not failure, failure
    assert not thread.is_alive()
    return scorer.stats.dead_lettered


class Background:
    """Run a supervisor's loop (restarts, autoscaling) and a paced replay in threads."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.replayed: ReplaySummary | None = None

    def supervise(self, supervisor: Supervisor) -> Supervisor:
        supervisor.start()
        thread = threading.Thread(target=supervisor.run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return supervisor

    def replay(self, settings: Settings, csv: Path, *, limit: int, rate: float) -> None:
        def target() -> None:
            self.replayed = replay(settings, csv, limit=limit, rate=rate, progress=False)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)
        self.replay_thread = thread

    def start(self, settings: Settings, model_dir: Path, history: Path, *, workers: int,
              orders: int, rate: float) -> tuple[Supervisor, int]:
        """A supervisor with ``workers`` that has every partition, then a replay of ``orders``
        at ``rate``; returns the supervisor and the wall-clock ms the replay started at."""
        supervisor = self.supervise(Supervisor(settings, model_dir, history, workers=workers))
        supervisor.wait_until_assigned(settings.topics.orders_partitions)
        since = int(time.time() * 1000)
        self.replay(settings, history / "orders.csv", limit=orders, rate=rate)
        return supervisor, since

    def replay_running(self) -> bool:
        return self.replay_thread.is_alive()

    def wait_replay(self, timeout_s: float = 300) -> ReplaySummary:
        self.replay_thread.join(timeout_s)
        assert self.replayed is not None and self.replayed.failed == 0, self.replayed
        return self.replayed


@dataclass
class Outcome:
    orders: int
    predictions: list[dict]
    by_offset: dict[tuple[int, int], list[dict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        grouped: dict[tuple[int, int], list[dict]] = defaultdict(list)
        for p in self.predictions:
            grouped[(p["order_partition"], p["order_offset"])].append(p)
        self.by_offset = dict(grouped)

    @property
    def duplicates(self) -> int:
        return len(self.predictions) - len(self.by_offset)

    def duplicated_offsets(self) -> list[tuple[int, int]]:
        return [key for key, copies in self.by_offset.items() if len(copies) > 1]

    def assert_nothing_lost_and_copies_identical(self, order_ids: list[str]) -> None:
        assert {p["order_id"] for p in self.predictions} == set(order_ids)
        assert len(self.by_offset) == self.orders  # one offset per replayed order
        for copies in self.by_offset.values():
            content = [{k: v for k, v in c.items() if k != "scored_at_ms"} for c in copies]
            assert all(c == content[0] for c in content)


def outcome(settings: Settings, order_ids: list[str], since_ms: int) -> Outcome:
    """Wait until every order has a prediction, then read every prediction (duplicates too)."""
    collect(settings.connection, settings.topics.predictions_topic, "prediction", set(order_ids),
            timeout_s=240, since_ms=since_ms)
    with TopicReader(settings.connection, settings.topics.predictions_topic,
                     "prediction") as reader:
        predictions = [p for _, p in reader.read(idle_s=3.0) if p["scored_at_ms"] >= since_ms]
    return Outcome(len(order_ids), predictions)


def report(name: str, **figures: object) -> None:
    DELIVERY_RESULTS.mkdir(parents=True, exist_ok=True)
    (DELIVERY_RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")


def order_ids(history: Path, n: int) -> list[str]:
    return read_orders_csv(history / "orders.csv", limit=n).order_id


def predictions(settings: Settings, order_ids: set[str], since_ms: int) -> dict[str, list]:
    """Every prediction record of ``order_ids``, revisions included (read until the topic
    has been quiet for the lateness allowance and two seconds)."""
    return collect(settings.connection, settings.topics.predictions_topic, "prediction",
                   order_ids, timeout_s=120, since_ms=since_ms,
                   settle_s=settings.reference.reference_lateness_ms / 1000 + 2.0)


def last(records: list[dict]) -> dict:
    """An order's highest revision (the later record on a tie)."""
    return max(reversed(records), key=lambda r: r["revision"])


def assert_never_silently_wrong(found: dict[str, list], expected: dict) -> int:
    """Every order's last revision has merge_asof's features, and every first prediction that
    differs is flagged or followed by a correction; returns how many were corrected."""
    wrong = [o for o, records in found.items() if last(records)["features"] != expected[o]]
    assert wrong == [], f"{len(wrong)} of {len(found)} orders end differing from merge_asof: " \
                        f"{wrong[:3]}"
    silent = [o for o, records in found.items() if records[0]["features"] != expected[o]
              and not records[0]["reference_wait_expired"] and last(records)["revision"] == 1]
    assert silent == [], f"{len(silent)} first predictions differ without a flag or a " \
                         f"correction: {silent[:3]}"
    return sum(last(records)["revision"] > 1 for records in found.values())
