"""A worker owning no partition says why (consumer/groupwatch.py): found by a new user, whose
restarted group logged ``group_join_started`` and then ``progress consumed 0`` for minutes.

On both brokers: a member of the group that stops polling holds a rebalance up to its
``max.poll.interval.ms`` while the partitions it must give up are owned by nobody; the worker
joining then says so within 2 x its session timeout, and scores once the member is gone (on
Apache Kafka from the group's description, on the embedded broker, which lists no members,
from the group's stalled commits). And a worker idle because the group has more members than
partitions is told apart: no warning.

This half needs no broker and starts no process; tests/integration/test_group_watch.py has the
rest.
"""

from __future__ import annotations

from confluent_kafka import ConsumerGroupState, TopicPartition
from confluent_kafka.admin import ConsumerGroupDescription, MemberAssignment, MemberDescription
from structlog.testing import capture_logs

from triage.consumer.groupwatch import GroupWatch, verdict, verdict_by_progress


def described(state: ConsumerGroupState, *owned: list[int], topic: str = "orders"
              ) -> ConsumerGroupDescription:
    """A group description as DescribeConsumerGroups returns it: a member per ``owned``."""
    members = [MemberDescription(f"member-{i}", "triage", "/10.0.0.1", MemberAssignment(
        [TopicPartition(topic, p) for p in parts])) for i, parts in enumerate(owned)]
    return ConsumerGroupDescription("g", False, members, "cooperative-sticky", state, None)


def test_the_verdict_tells_unowned_partitions_from_more_workers_than_partitions() -> None:
    stuck = verdict(described(ConsumerGroupState.STABLE, [0], []), "orders", [0, 1, 2])
    assert stuck.stalled and stuck.unowned == [1, 2]
    idle = verdict(described(ConsumerGroupState.STABLE, [0, 1], [2], []), "orders", [0, 1, 2])
    assert not idle.stalled and idle.unowned == []
    rebalancing = verdict(described(ConsumerGroupState.PREPARING_REBALANCING, [0, 1, 2], []),
                          "orders", [0, 1, 2])
    assert rebalancing.stalled and rebalancing.state == "PREPARING_REBALANCING"
    other_topic = verdict(described(ConsumerGroupState.STABLE, [0, 1], topic="other"),
                          "orders", [0, 1])
    assert other_topic.stalled and other_topic.unowned == [0, 1]


def test_without_members_listed_a_partition_whose_commit_stands_still_behind_its_end_stalls(
        ) -> None:
    """The embedded broker describes a group without its members: the group's progress
    decides."""
    found = verdict_by_progress({0: 5, 1: 7, 2: None, 3: 4}, {0: 5, 1: 9, 2: None, 3: 4},
                                {0: 10, 1: 12, 2: 3, 3: 4}, "STABLE")
    assert found.stalled and found.unowned == [0, 2]  # 1 moves, 3 is at its end
    assert not verdict_by_progress({0: 5}, {0: 6}, {0: 10}, "STABLE").stalled


def test_on_a_broker_listing_no_members_a_stall_is_a_whole_allowance_without_a_commit(
        ) -> None:
    now = [0.0]
    committed = {0: 3}
    sampled: list[float] = []

    def progress() -> dict[int, tuple[int | None, int]]:
        sampled.append(now[0])
        return {p: (c, 10) for p, c in committed.items()}

    with capture_logs() as logs:
        watch = GroupWatch("g", "orders", 12_000,
                           lambda: (described(ConsumerGroupState.STABLE), [0]), progress,
                           log=__import__("structlog").get_logger(), clock=lambda: now[0])
        watch.tick(set())  # owning nothing from now: the first sample
        now[0], committed[0] = 11.0, 4  # a peer committed within the allowance
        assert watch.tick(set()) is None
        now[0] = 12.0
        found = watch.tick(set())
        assert found is not None and not found.stalled and not found.known
        now[0] = 24.0  # judged by commits, not members: the next look one allowance later
        found = watch.tick(set())
        assert found is not None and found.stalled and found.unowned == [0]
    assert sampled == [0.0, 12.0, 24.0]
    assert [e["event"] for e in logs] == ["idle_no_partition", "partitions_unowned"]
    assert "the broker lists no members" in logs[0]["note"]
    assert "or by one that has not committed for 12 s" in logs[1]["note"]


def test_a_topic_at_its_end_on_a_broker_listing_no_members_is_not_called_owned() -> None:
    """Nothing to read shows nothing: not 'every partition is owned by another member'."""
    with capture_logs() as logs:
        watch = GroupWatch("g", "orders", 12_000,
                           lambda: (described(ConsumerGroupState.STABLE), [0, 1]),
                           lambda: {0: (10, 10), 1: (None, 0)},
                           log=__import__("structlog").get_logger(), clock=lambda: 99.0)
        watch.tick(set())
        watch._next_check = 0.0
        found = watch.tick(set())
    assert found is not None and not found.stalled
    assert "more workers than partitions" not in logs[0]["note"]


def test_the_watch_describes_only_after_owning_nothing_for_its_allowance() -> None:
    now = [0.0]
    asked: list[int] = []

    def describe() -> tuple[ConsumerGroupDescription, list[int]]:
        asked.append(1)
        return described(ConsumerGroupState.STABLE, [0], []), [0, 1]

    with capture_logs() as logs:
        watch = GroupWatch("g", "orders", 12_000, describe, dict,
                           log=__import__("structlog").get_logger(), clock=lambda: now[0])
        for t in (0.0, 1.0, 6.0, 11.9):
            now[0] = t
            assert watch.tick(set()) is None
        now[0] = 12.0
        found = watch.tick(set())
        assert found is not None and found.unowned == [1]
        now[0] = 12.5  # stalled: looked at again an allowance later, not sooner
        assert watch.tick(set()) is None
        now[0] = 13.0
        watch.tick({1})  # owns a partition: the clock starts again when it owns none
        for t in (14.0, 25.9):  # owning nothing again from 14.0
            now[0] = t
            assert watch.tick(set()) is None
    assert len(asked) == 1
    assert [e["event"] for e in logs] == ["partitions_unowned"]
    assert "docs/operating.md" in logs[0]["note"]


def test_a_worker_idle_by_its_groups_members_looks_again_5_allowances_later() -> None:
    now, asked = [0.0], []

    def describe() -> tuple[ConsumerGroupDescription, list[int]]:
        asked.append(now[0])
        return described(ConsumerGroupState.STABLE, [0], []), [0]

    watch = GroupWatch("g", "orders", 12_000, describe, dict,
                       log=__import__("structlog").get_logger(), clock=lambda: now[0])
    for t in (0.0, 12.0, 24.0, 71.9, 72.0):
        now[0] = t
        watch.tick(set())
    assert asked == [12.0, 72.0]
