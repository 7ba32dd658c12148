"""A worker that owns no partition says why, instead of waiting without a word.

A worker owning no partition of the orders topic is normal when the group has more members than
the topic has partitions. It is a fault when the topic has partitions that no member owns: the
group is stuck in a rebalance (a member that stopped polling holds it up to that member's
``max.poll.interval.ms``), or the broker lost track of the group (the embedded broker sometimes
never assigns a group restarted after it sat empty: docs/operating.md, "The embedded broker's
differences from Apache Kafka"). Found by a new user: workers logged
``group_join_started``, then ``progress consumed 0`` for minutes.

:class:`GroupWatch` is told on every turn of the loop what the worker owns. Once it has owned
nothing for 2 x the session timeout it describes the group (Kafka's DescribeConsumerGroups) and
the topic, and then

* if some partitions are owned by no member, or the group is not stable, logs the warning
  ``partitions_unowned`` with the group's state and members and what to do, and counts
  ``triage_group_stalls_total``; it checks again 2 x the session timeout later. The worker
  stays in the group: once the member holding the rebalance leaves (or is evicted at its
  ``max.poll.interval.ms``), the group assigns the partitions and the worker scores, on both
  brokers (tests/test_group_watch.py). Leaving and joining again does not help there, and on
  the embedded broker it strands the group for good (measured), so the watch never does it;
* if every partition is owned by another member, logs ``idle_no_partition`` once (info): more
  workers than partitions; and looks again only 5 allowances later;
* if the broker cannot be asked, logs ``group_undescribed`` (info) and asks again later.

The embedded broker describes a group without its members. There the verdict comes from the
group's progress instead (:func:`verdict_by_progress`): a partition with records beyond the
group's committed offset, whose committed offset has not moved in the last session timeout, is
taken as owned by nobody (or by a member that neither consumes nor leaves: as bad). A topic
at its end shows nothing either way: the worker says so (info) and looks again every
allowance, so an order that arrives and that no member takes is warned about within 2
allowances of its arrival (found by a new user: a restarted group on the embedded broker).

The verdicts are functions of what the broker said, so that they are tested on their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import ConsumerGroupDescription  # type: ignore[attr-defined]

from triage.consumer import metrics


@dataclass(frozen=True)
class Verdict:
    """What the description of the group says of a worker that owns nothing.

    ``unowned``: partitions of the topic in no member's assignment; ``stalled``: the worker
    waits on a fault (unowned partitions, or a group that is not stable); ``state``: the
    group's state as Kafka names it; ``members``: ``client_id@host`` of each member with the
    partitions of the topic it owns."""

    stalled: bool
    unowned: list[int]
    state: str
    members: dict[str, list[int]]
    known: bool = True  # False: judged by the group's progress, its members unlisted


def verdict(description: ConsumerGroupDescription, topic: str, partitions: Iterable[int]
            ) -> Verdict:
    """The verdict on a worker owning no partition of ``topic`` (whose partitions are
    ``partitions``) in the group ``description`` describes."""
    members: dict[str, list[int]] = {}
    owned: set[int] = set()
    for member in description.members:
        mine = sorted(tp.partition for tp in (member.assignment.topic_partitions or [])
                      if tp.topic == topic)
        members[f"{member.client_id}@{member.host} ({member.member_id[-8:]})"] = mine
        owned.update(mine)
    unowned = sorted(set(partitions) - owned)
    state = getattr(description.state, "name", str(description.state))
    stable = description.state == ConsumerGroupState.STABLE
    return Verdict(bool(unowned) or not stable, unowned, state, members)


def verdict_by_progress(before: dict[int, int | None], now: dict[int, int | None],
                        ends: dict[int, int], state: str) -> Verdict:
    """The verdict from the group's committed offsets (partition -> offset, None if none)
    sampled twice, ``before`` and ``now``, and the partitions' end offsets ``ends``: stalled
    if a partition has records beyond its committed offset (from the start without one) and
    its commit did not move between the samples."""
    unowned = sorted(p for p, end in ends.items()
                     if end > (now.get(p) or 0) and p in before and before[p] == now.get(p))
    return Verdict(bool(unowned), unowned, state, {})


class GroupWatch:
    """Watches a worker's ownership; see the module docstring.

    ``describe()`` returns the group's description and the topic's partition numbers (it may
    raise). ``progress()`` returns the group's committed offset and the end offset of each
    partition, ``{partition: (committed or None, end)}``, for a broker that lists no members
    (it may raise); the committed offsets are sampled when the worker starts owning nothing
    and at each check, so a stall is a whole allowance without a commit. ``after_ms``: how long
    owning nothing is allowed (2 x the session timeout; under KIP-848 still the client's
    TRIAGE_SESSION_TIMEOUT_MS, which the broker's session timeout may exceed). After a check
    whose members' assignments show nothing wrong the next comes 5 allowances later.
    ``background``: run the checks (seconds of broker requests) on a thread of their own, so
    that the loop never waits for them; without it :meth:`tick` runs them and returns the
    verdict. ``clock``: monotonic seconds."""

    def __init__(self, group: str, topic: str, after_ms: int,
                 describe: Callable[[], tuple[ConsumerGroupDescription, list[int]]],
                 progress: Callable[[], dict[int, tuple[int | None, int]]], log: Any,
                 clock: Callable[[], float] = time.monotonic, background: bool = False
                 ) -> None:
        self.group, self.topic, self.after_s = group, topic, after_ms / 1000.0
        self._describe, self._progress = describe, progress
        self.log, self.clock, self.background = log, clock, background
        self._since: float | None = None  # owning nothing since (None: owns some)
        self._next_check = 0.0
        self._sample: dict[int, int | None] | None = None  # committed offsets at the last look
        self._said_idle = False
        self._checking: threading.Thread | None = None
        self.stalls = 0

    def tick(self, owned: set[int]) -> Verdict | None:
        """Called on every turn of the loop with the partitions owned; returns the verdict
        when it checked the group on this turn (never in the background mode)."""
        if owned:
            self._since, self._said_idle, self._sample = None, False, None
            return None
        now = self.clock()
        busy = self._checking is not None and self._checking.is_alive()
        if self._since is None:
            self._since, self._next_check = now, now + self.after_s
            if not busy:
                self._run(self._take_sample)
            return None
        if now < self._next_check or busy:
            return None
        self._next_check = now + self.after_s
        return self._run(lambda: self._check(now))

    def _run(self, step: Callable[[], Verdict | None]) -> Verdict | None:
        """``step()`` here, or on the watch's thread in the background mode (returns None)."""
        if not self.background:
            return step()
        self._checking = threading.Thread(target=step, name="group-watch", daemon=True)
        self._checking.start()
        return None

    def _take_sample(self) -> None:
        self._sample = self._committed()

    def _check(self, now: float) -> Verdict | None:
        """Describe the group, judge, and say so (module docstring)."""
        before = self._sample
        try:
            description, partitions = self._describe()
            if description.members:
                found = verdict(description, self.topic, partitions)
            else:  # the embedded broker lists no members: judge by the group's progress
                offsets = self._progress()
                self._sample = {p: c for p, (c, _) in offsets.items()}
                found = verdict_by_progress(
                    before or {}, self._sample, {p: end for p, (_, end) in offsets.items()},
                    getattr(description.state, "name", str(description.state)))
                found = replace(found, known=False)
        except Exception as exc:  # the broker answers later, or never: the loop goes on
            self.log.info("group_undescribed", group=self.group, error=str(exc))
            return None
        if self._since is None:  # partitions came while the broker was asked: nothing to say
            return found
        idle_s = round(now - self._since, 1)
        if found.stalled:
            self.stalls += 1
            metrics.GROUP_STALLS.inc()
            self.log.warning(
                "partitions_unowned", group=self.group, topic=self.topic,
                owned_nothing_for_s=idle_s, unowned=found.unowned, group_state=found.state,
                members=found.members,
                note=f"this worker has owned no partition of {self.topic} for {idle_s} s while "
                f"{len(found.unowned)} of its {len(partitions)} partitions are owned by no "
                f"member of group {self.group} (state {found.state})"
                + ("" if found.known else ", or by one that has not committed for "
                   f"{self.after_s:g} s") + ". A member that stopped polling holds a "
                "rebalance up to its max.poll.interval.ms (the partitions come once it leaves "
                "or is evicted). On the embedded broker a group restarted after it sat empty "
                "can stay unassigned: restart `triage broker` (it keeps nothing), or use a new "
                "group (--group or TRIAGE_GROUP_ID; a new group reads the topic from the "
                "beginning). See docs/operating.md, \"The embedded broker's differences from "
                "Apache Kafka\".")
            return found
        if found.known:  # the members say it: look again much later
            self._next_check = max(self._next_check, now + 5 * self.after_s)
        if not self._said_idle:
            self._said_idle = True
            self.log.info(
                "idle_no_partition", group=self.group, topic=self.topic,
                members=len(found.members), partitions=len(partitions),
                note="every partition is owned by another member: more workers than "
                     "partitions; this one takes over when a member leaves" if found.known
                else "the broker lists no members and the group's commits keep up with the "
                     "topic: nothing shows a stall now; if records arrive and no member takes "
                     "them, this worker says so")
        return found

    def _committed(self) -> dict[int, int | None]:
        """The group's committed offsets now ({} if the broker cannot say)."""
        try:
            return {p: committed for p, (committed, _) in self._progress().items()}
        except Exception:
            return {}
