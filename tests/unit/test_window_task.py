"""The feature stage's task (scoring/window_task.py), driven as the stage drives it: orders from
several upstream partitions, out of order within them and interleaved, with the upstream
partitions' watermark markers, restarts from the changelog in between. What it publishes
(the highest revision of each order) equals the brute-force reading of the window rule
(tests/unit/test_windows.py ``oracle``) for every order; when no order arrived after the
watermark had passed it, each is published once."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_windows import features, histories, oracle
from triage.bus.errors import ConfigurationError
from triage.bus.settings import TopicSettings
from triage.cli import main
from triage.consumer.window_stage import WindowMetrics, chosen_features
from triage.model.windows import DAY_MS, WINDOWED_FEATURES, WindowedFeature, window_topic_specs
from triage.scoring.window_task import (
    MARKS_KEY,
    MIN_MS,
    WindowOutput,
    WindowTask,
    changelog_key,
)

EXAMPLES = settings(max_examples=200, deadline=None)
Changelog = list[tuple[bytes | None, bytes | None]]


class Run:
    """A task, its changelog and what it published, restartable from the changelog."""

    def __init__(self, entity: str, feats: list[WindowedFeature], upstream: int,
                 retention_ms: int) -> None:
        self.args = (entity, feats, upstream, retention_ms)
        self.task = WindowTask(*self.args)
        self.changelog: Changelog = []
        self.published: list[WindowOutput] = []

    def take(self, outputs: list[WindowOutput]) -> None:
        self.published.extend(outputs)
        self.changelog.extend(self.task.changes())  # committed with the outputs

    def restart(self) -> None:
        self.task = WindowTask(*self.args)
        self.task.restore(self.changelog)

    def latest(self) -> dict[tuple[str, str], WindowOutput]:
        found: dict[tuple[str, str], WindowOutput] = {}
        for out in self.published:
            key = (out.order_id, out.entity_value)
            if key not in found or out.revision > found[key].revision:
                found[key] = out
        return found


def as_value(value: Any) -> float | None:
    """A value as the stage publishes it: counts as floats."""
    return None if value is None else float(value)


@EXAMPLES
@given(records=histories(), feature=features(), seed=st.integers(0, 2**32 - 1),
       upstream=st.integers(1, 3), restarts=st.integers(0, 3), lateness=st.integers(0, 5))
def test_published_values_equal_the_rule_under_disorder_and_restarts(
        records: list[dict[str, Any]], feature: WindowedFeature, seed: int, upstream: int,
        restarts: int, lateness: int) -> None:
    """Each record goes to a random orders partition, up to 10 ms out of order there; the
    partitions interleave at random; a record is published when it is read (the clock counts
    records, from 100), and after each read the partition may send its marks, busy or (its
    queue empty) quiet at the clock less the lateness."""
    rng = random.Random(seed)
    run = Run(feature.entity, [feature], upstream, retention_ms=10_000)  # nothing expires
    queues: list[list[dict[str, Any]]] = [[] for _ in range(upstream)]
    for r in records:
        queues[rng.randrange(upstream)].append(r)
    for queue in queues:
        queue.sort(key=lambda r: r["timestamp_ms"] + rng.randint(0, 10))
    read_max = [MIN_MS] * upstream
    steps = sum(map(len, queues))
    restart_at = {rng.randrange(steps + 1) for _ in range(restarts)}
    for step in range(steps + 1):
        if step in restart_at:
            run.restart()
        if step == steps:
            break
        clock = 100 + step
        u = rng.choice([i for i, q in enumerate(queues) if q])
        r = queues[u].pop(0)
        if r[feature.entity]:
            run.take(run.task.add(r, published_ms=clock))
        read_max[u] = max(read_max[u], r["timestamp_ms"])
        if rng.random() < 0.5:
            quiet = clock - lateness if not queues[u] else MIN_MS
            run.take(run.task.advance(u, read_max[u], quiet))
    for u in range(upstream):  # every partition goes quiet: the clock jumps past everything
        run.take(run.task.advance(u, read_max[u], 10**9))
    assert run.task.waiting == 0
    expected = oracle(records, feature)
    latest = run.latest()
    for r, value in zip(records, expected, strict=True):
        if not r[feature.entity]:
            continue
        out = latest[(r["order_id"], r[feature.entity])]
        assert out.values == {feature.name: as_value(value)}, (r, out)
        assert not out.window_expired


def order(order_id: str, time_ms: int, customer: str = "C", zip_code: str = "1"
          ) -> dict[str, Any]:
    return {"order_id": order_id, "customer_id": customer, "sku_code": "S",
            "zip_code": zip_code, "timestamp_ms": time_ms}


COUNT = WindowedFeature("orders_100ms", "customer_id", "count", 100)
ZIPS = WindowedFeature("zips_100ms", "customer_id", "distinct_count", 100, of="zip_code",
                       include_self=True)


def test_an_order_waits_until_every_orders_partition_passed_it() -> None:
    """A partition passes an order when it delivered a later order: at the order's own
    millisecond another may still come, with a smaller order_id, before it. One that has sent
    no marker holds it, a partition beyond the count known (partitions added) too."""
    task = WindowTask("customer_id", [COUNT], upstream=2, retention_ms=1000)
    assert task.add(order("B", 10), published_ms=10) == []
    assert task.advance(0, 50) == []  # partition 1 has said nothing
    assert task.advance(2, 50) == []  # a third partition appeared: it counts from now on
    assert task.advance(1, 10) == []  # at B's millisecond: not past it
    assert task.add(order("A", 10), published_ms=11) == []  # A comes before B
    out = task.advance(1, 11)
    assert [(o.order_id, o.revision, o.values) for o in out] == [
        ("A", 1, {"orders_100ms": 0.0}), ("B", 1, {"orders_100ms": 1.0})]


def test_quiet_partitions_pass_an_order_once_the_clock_passed_its_time_and_publication(
        ) -> None:
    """The live join's rule: a partition with nothing left to read passes an order once it
    was quiet with the clock the lateness past the later of the order's time and its
    publication (a replay of old orders is not answered before its own publication)."""
    task = WindowTask("customer_id", [COUNT], upstream=2, retention_ms=1000)
    task.add(order("A", 100), published_ms=5000)
    assert task.advance(0, 100, quiet=4999) == []
    assert task.advance(1, MIN_MS, quiet=4999) == []
    assert task.advance(0, 100, quiet=5000) == []  # partition 1 still at 4999
    out = task.advance(1, MIN_MS, quiet=5000)
    assert [(o.order_id, o.revision) for o in out] == [("A", 1)]


def test_a_late_order_is_answered_at_once_and_corrects_the_orders_it_changes() -> None:
    task = WindowTask("customer_id", [COUNT, ZIPS], upstream=1, retention_ms=1000)
    task.add(order("A", 10, zip_code="1"), published_ms=10)
    task.add(order("C", 30, zip_code="1"), published_ms=30)
    first = task.advance(0, 40)
    assert [(o.order_id, o.values) for o in first] == [
        ("A", {"orders_100ms": 0.0, "zips_100ms": 1.0}),
        ("C", {"orders_100ms": 1.0, "zips_100ms": 1.0})]
    late = task.add(order("B", 20, zip_code="2"), published_ms=41)  # the partition passed 40
    assert [(o.order_id, o.revision, o.values) for o in late] == [
        ("B", 1, {"orders_100ms": 1.0, "zips_100ms": 2.0}),
        ("C", 2, {"orders_100ms": 2.0, "zips_100ms": 2.0})]  # A is before B: unchanged
    assert task.add(order("B", 25, zip_code="3"), published_ms=42) == []  # a later record


def test_beyond_the_retention_orders_say_they_could_not_know() -> None:
    """More than the retention behind the latest order answered, the windows may have lost
    orders: such an order is published with window_expired and no values, and so is an
    answered order it changes there (its next revision); a late order further back than the
    task holds anything is counted."""
    task = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=50)
    task.add(order("A", 200), published_ms=200)
    task.add(order("B", 300), published_ms=300)
    first = task.advance(0, 301)  # frontier 300, horizon 250
    assert [(o.order_id, o.values) for o in first] == [("A", {"orders_100ms": 0.0}),
                                                        ("B", {"orders_100ms": 0.0})]
    out = task.add(order("X", 180), published_ms=301)
    assert [(o.order_id, o.revision, o.window_expired, o.values) for o in out] == [
        ("X", 1, True, {"orders_100ms": None}),
        ("A", 2, True, {"orders_100ms": None})]  # A, at 200, would see X: it cannot say
    assert task.beyond_retention == 0
    out = task.add(order("Y", 100), published_ms=302)  # at or before 250 - 100 - 50
    assert [(o.order_id, o.revision, o.window_expired) for o in out] == [("Y", 0, True)]
    assert task.beyond_retention == 1 and ("Y", "C") not in task.entries


def test_a_forgotten_order_read_again_never_stands_above_its_answer() -> None:
    task = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10)
    first = task.add(order("A", 0), 0) + task.advance(0, 1)
    task.add(order("B", 1000), 1000)
    task.advance(0, 1001)  # A is forgotten (at or before 1000 - 10 - 100 - 10)
    again = task.add(order("A", 0), 1002)  # a redelivery
    assert [(o.revision, o.values) for o in first] == [(1, {"orders_100ms": 0.0})]
    assert [(o.revision, o.window_expired) for o in again] == [(0, True)]


def test_the_changelog_restores_the_task_and_forgets_with_tombstones() -> None:
    task = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10)
    changelog: Changelog = []
    for i in range(5):
        task.add(order(f"O-{i}", i * 10), published_ms=i * 10)
    changelog += task.changes()
    task.advance(0, 25)  # O-0 .. O-2 answered, O-3 and O-4 wait
    changelog += task.changes()
    restored = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10)
    assert restored.restore(changelog) == 5
    assert restored.frontier == 20 and restored.marks == {0: (25, MIN_MS)}
    out = restored.advance(0, 41)  # the waiting ones come out, the answered ones do not
    assert [(o.order_id, o.values["orders_100ms"]) for o in out] == [("O-3", 3.0),
                                                                       ("O-4", 4.0)]
    restored.changes()
    restored.add(order("O-5", 1000), published_ms=1000)
    restored.advance(0, 1001)  # frontier 1000: O-0 .. O-4 are forgotten (at or before 880)
    changes = dict(restored.changes())
    assert sorted(json.loads(k)[0] for k, v in changes.items() if k != MARKS_KEY and v is None
                  ) == [f"O-{i}" for i in range(5)]
    assert len(restored) == 1
    again = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10)
    assert again.restore([*changelog, *changes.items()]) == 1


def test_orders_in_order_are_answered_once() -> None:
    """Orders read in time order in every partition, with busy marks: no correction."""
    task = WindowTask("customer_id", [COUNT, ZIPS], upstream=2, retention_ms=1000)
    published = []
    for i in range(40):
        published += task.add(order(f"O-{i}", i * 7, customer=f"C-{i % 3}",
                                    zip_code=str(i % 5)), published_ms=i * 7)
        published += task.advance(i % 2, i * 7)
    published += task.advance(0, 10**6) + task.advance(1, 10**6)
    assert sorted(o.order_id for o in published) == sorted(f"O-{i}" for i in range(40))
    assert {o.revision for o in published} == {1}


def test_the_stage_takes_declared_features_and_refuses_others_by_name() -> None:
    assert chosen_features([]) == WINDOWED_FEATURES
    assert [f.name for f in chosen_features(["sku_orders_10m"])] == ["sku_orders_10m"]
    with pytest.raises(ConfigurationError, match="customer_orders_2h, not declared; the "
                                                 "windowed features are customer_orders_1h"):
        chosen_features(["customer_orders_2h"])


def test_triage_windows_refuses_an_undeclared_feature_before_it_connects(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["windows", "--features", "nope", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "TRIAGE_WINDOWED_FEATURES (--features) names nope, not declared" in \
        capsys.readouterr().err


def test_the_stage_topics_one_pair_per_entity_with_a_changelog_kept_past_its_windows(
        ) -> None:
    topics = TopicSettings(orders_partitions=3)
    specs = window_topic_specs(topics, WINDOWED_FEATURES, retention_ms=3_600_000)
    assert specs == {
        "windows.customer_id-repartition": (3, {}),
        "windows.customer_id-changelog": (3, {"cleanup.policy": "compact,delete",
                                              "retention.ms": str(7 * DAY_MS + 3_600_000
                                                                  + DAY_MS)}),
        "windows.sku_code-repartition": (3, {}),
        "windows.sku_code-changelog": (3, {"cleanup.policy": "compact,delete",
                                           "retention.ms": str(600_000 + 3_600_000 + DAY_MS)}),
        # What the changelogs keep, as the scorers read it from the beginning.
        "windowed_features": (3, {"retention.ms": str(7 * DAY_MS + 3_600_000 + DAY_MS)}),
    }
    assert window_topic_specs(topics, [], retention_ms=1) == {}


@EXAMPLES
@given(records=histories(), feature=features(), seed=st.integers(0, 2**32 - 1),
       retention=st.integers(0, 30), later=st.lists(st.tuples(st.integers(0, 39),
                                                              st.integers(1, 30)), max_size=8))
def test_a_task_restored_from_its_changelog_publishes_what_the_task_would_have(
        records: list[dict[str, Any]], feature: WindowedFeature, seed: int, retention: int,
        later: list[tuple[int, int]]) -> None:
    """The same arrivals and marks into one task and into one restarted from its changelog
    at random points, with a small retention (orders forgotten, late ones expired) and
    records of an order read again later in time: the same outputs, one for one."""
    records = records + [{**records[i], "timestamp_ms": records[i]["timestamp_ms"] + dt}
                         for i, dt in later if i < len(records)]
    runs = []
    for restarts in (False, True):
        rng = random.Random(seed)
        run = Run(feature.entity, [feature], 1, retention_ms=retention)
        read_max = MIN_MS
        for step, r in enumerate(sorted(records, key=lambda r: r["timestamp_ms"]
                                        + rng.randint(0, 10))):
            if restarts and rng.random() < 0.3:
                run.restart()
            else:
                rng.random()  # the same draws either way
            if r[feature.entity]:
                run.take(run.task.add(r, published_ms=100 + step))
            read_max = max(read_max, r["timestamp_ms"])
            run.take(run.task.advance(0, read_max, 100 + step - 3))
        run.take(run.task.advance(0, 10**9, 10**9))
        runs.append(run.published)
    assert runs[0] == runs[1]


def test_a_later_record_of_an_order_after_a_restore_is_not_counted_again() -> None:
    """The state's memory of an order runs from its latest record, restored too (an order
    read again at 400 and 450 counted twice after a restart, before)."""
    count = WindowedFeature("orders_100ms", "customer_id", "count", 100)
    outputs: dict[str, list[WindowOutput]] = {}
    for restart in (False, True):
        run = Run("customer_id", [count], 1, retention_ms=50)
        run.take(run.task.add(order("A", 100), 100))
        run.take(run.task.advance(0, 101))
        run.take(run.task.add(order("A", 400), 400))
        if restart:
            run.restart()
        run.take(run.task.add(order("B", 500), 500))
        run.take(run.task.advance(0, 501))
        run.take(run.task.add(order("A", 450), 501))
        run.take(run.task.add(order("C", 520), 520))
        run.take(run.task.advance(0, 521))
        outputs[str(restart)] = run.published
    assert outputs["True"] == outputs["False"]
    assert run.latest()[("C", "C")].values == {"orders_100ms": 1.0}  # B; A stands at 100


def test_a_replaced_record_does_not_release_its_order_early() -> None:
    """An earlier record that replaces a waiting order's record, published later, raises
    what a quiet partition must have passed (max(T, P)); the figure of the record it
    replaced no longer answers it."""
    task = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=1000)
    task.add(order("A", 50), published_ms=50)
    task.add(order("A", 30), published_ms=200)  # stands now: needs max(30, 200)
    assert task.advance(0, MIN_MS, quiet=100) == []
    assert [o.order_id for o in task.advance(0, MIN_MS, quiet=200)] == ["A"]


def test_a_restore_writes_the_tombstones_of_what_it_forgets() -> None:
    task = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10)
    changelog: Changelog = []
    task.add(order("A", 0), published_ms=0)
    task.advance(0, 1)
    changelog += task.changes()
    saved = json.loads(changelog[-1][1] or b"{}")
    saved["frontier"] = 10_000  # as if later turns moved it and forgot nothing yet
    changelog.append((MARKS_KEY, json.dumps(saved).encode()))
    restored = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10)
    assert restored.restore(changelog) == 0
    assert (json.dumps(["A", "C"]).encode(), None) in restored.changes()


def test_a_restore_pauses_the_garbage_collector_and_leaves_it_as_it_found_it() -> None:
    import gc

    seen: list[bool] = []

    def records() -> Iterator[tuple[bytes, bytes | None]]:
        seen.append(gc.isenabled())
        yield from ()

    features = [w for w in WINDOWED_FEATURES if w.entity == "customer_id"]
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            WindowTask("customer_id", features, 1, 3_600_000).restore(records())
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
    assert seen == [False, False]


@given(order_id=st.text(), value=st.text())
def test_a_changelog_key_is_the_bytes_json_dumps_gave_it(order_id: str, value: str) -> None:
    """Compaction keeps the last record of each key's bytes: a key built another way for the
    same order would leave the record of the earlier build standing beside it (a changelog
    written before the key was built by hand holds json.dumps's)."""
    assert changelog_key((order_id, value)) == json.dumps([order_id, value]).encode()


def test_a_changelog_value_that_is_not_one_json_document_is_refused() -> None:
    task = WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10)
    task.add(order("O-1", 10), published_ms=10)
    (key, value), = task.changes()
    assert value is not None
    with pytest.raises(ValueError, match="not one JSON document"):
        WindowTask("customer_id", [COUNT], upstream=1, retention_ms=10).restore(
            [(key, value + b" {}")])


def test_the_stage_exports_its_stores_labelled_series_at_zero_from_the_start() -> None:
    """An alert's increase() sees no increase from a series that first appears at N: records
    beyond the retention in a pod's first scrape interval went unseen (a review found it)."""
    registry = WindowMetrics(("customer_id", "sku_code")).registry
    for store in ("customer_id", "sku_code"):
        assert registry.get_sample_value("triage_windows_beyond_retention_total",
                                         {"store": store}) == 0.0
        for kind in ("first", "correction", "expired"):
            assert registry.get_sample_value("triage_windows_answers_total",
                                             {"store": store, "kind": kind}) == 0.0
        assert registry.get_sample_value("triage_windows_waiting_orders", {"store": store}) == 0
