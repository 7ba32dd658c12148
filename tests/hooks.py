"""Hooks for tests, loaded by worker processes through ``TRIAGE_HOOKS``: the project's own
extension point, used as a user's hook would be, instead of test-only code in the hot loop."""

from __future__ import annotations

import os
import signal
import threading
import time

from triage.scoring.hooks import ScoredBatch
from triage.scoring.settings import ScoringSettings

SLOW_BATCH_ENV = "TRIAGE_TEST_SLOW_BATCH_MS"


class SlowBatches:
    """Makes a worker slow on purpose: sleeps ``$TRIAGE_TEST_SLOW_BATCH_MS`` after each scored
    batch (``TRIAGE_HOOKS=tests.hooks:SlowBatches``)."""

    name = "slow_batches"

    def __init__(self, settings: ScoringSettings) -> None:
        self.seconds = float(os.environ.get(SLOW_BATCH_ENV, "0")) / 1000.0

    def observe(self, batch: ScoredBatch) -> None:
        time.sleep(self.seconds)


class FreezeOnSignal:
    """Makes a worker's loop stuck on demand (``TRIAGE_HOOKS=tests.hooks:FreezeOnSignal``): on
    SIGUSR1 its main thread, the one that runs the loop, blocks in the signal handler until
    the process is killed, while its other threads (the health server) go on. Installed by
    the hook's factory, which runs on the main thread."""

    name = "freeze_on_signal"

    def __init__(self, settings: ScoringSettings) -> None:
        signal.signal(signal.SIGUSR1, lambda *_: threading.Event().wait())

    def observe(self, batch: ScoredBatch) -> None:
        """Nothing per batch: the freeze comes from the signal."""
