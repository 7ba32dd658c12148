"""When to add or remove a worker, from the group's lag over a sliding window of samples.

Grow by one when the lag at the end of a full window is above the one at its start and above
``grow_above`` records (the backlog keeps growing: the workers are not keeping up). Shrink by
one when every sample of a full window is zero (the backlog is drained). After each decision
the window starts over, so the group has time to rebalance before the next one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from triage.bus.settings import SettingsError


@dataclass(frozen=True)
class Decision:
    change: int          # +1, -1 or 0
    reason: str
    lag_window: tuple[int, ...]


@dataclass
class Autoscaler:
    min_workers: int
    max_workers: int
    window: int = 6
    grow_above: int = 1000
    samples: deque[int] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise SettingsError(f"need 1 <= --min ({self.min_workers}) <= --max "
                             f"({self.max_workers})")
        if self.window < 2:
            raise SettingsError("the autoscaling window needs at least 2 samples")

    def decide(self, lag: int, workers: int) -> Decision:
        self.samples.append(lag)
        while len(self.samples) > self.window:
            self.samples.popleft()
        window = tuple(self.samples)
        if len(window) < self.window:
            return Decision(0, "filling window", window)
        if window[-1] > window[0] and window[-1] > self.grow_above:
            if workers < self.max_workers:
                self.samples.clear()
                return Decision(+1, "lag grew over the window", window)
            return Decision(0, "lag grew but already at --max", window)
        if max(window) == 0 and workers > self.min_workers:
            self.samples.clear()
            return Decision(-1, "lag drained over the window", window)
        return Decision(0, "steady", window)
