"""Hooks for tests, loaded by worker processes through ``TRIAGE_HOOKS``: the project's own
extension point, used as a user's hook would be, instead of test-only code in the hot loop."""

from __future__ import annotations

import os
import time

from triage.bus.settings import Settings
from triage.consumer.hooks import ScoredBatch

SLOW_BATCH_ENV = "TRIAGE_TEST_SLOW_BATCH_MS"


class SlowBatches:
    """Makes a worker slow on purpose: sleeps ``$TRIAGE_TEST_SLOW_BATCH_MS`` after each scored
    batch (``TRIAGE_HOOKS=tests.hooks:SlowBatches``)."""

    name = "slow_batches"

    def __init__(self, settings: Settings) -> None:
        self.seconds = float(os.environ.get(SLOW_BATCH_ENV, "0")) / 1000.0

    def observe(self, batch: ScoredBatch) -> None:
        time.sleep(self.seconds)
