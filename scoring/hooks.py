"""Per-batch processing hooks: add checks to the scorer without editing its loop.

A hook is an object with either or both of these methods:

* ``check(orders: list[dict]) -> Iterable[Rejection]``: runs on every decoded batch before
  scoring. Each :class:`Rejection` sends that order to the dead-letter topic with its reason;
  the rest of the batch is scored. The built-in validation (:mod:`triage.scoring.validation`) is
  such a hook.
* ``observe(batch: ScoredBatch) -> None``: runs after the batch is scored and its predictions
  are produced, for latency checks, data thresholds, extra metrics or alerts. It cannot
  reject anything.

Register hooks with ``TRIAGE_HOOKS=package.module:factory,other.module:factory``. Each factory is
called once per worker with the process's settings (a
:class:`~triage.scoring.settings.ScoringSettings`) and returns the hook.
The hook API is this module's ``__all__``, under the project's own import name. Example::

    # mycompany/hooks.py
    from triage.scoring.hooks import Rejection

    BLOCKED = {"C-666"}

    class BlockedCustomers:
        def __init__(self, settings): ...
        def check(self, orders):
            return [Rejection(i, "blocked_customer", "on the block list")
                    for i, o in enumerate(orders) if o["customer_id"] in BLOCKED]

    # TRIAGE_HOOKS=mycompany.hooks:BlockedCustomers

A hook that raises never stops the loop: if ``check`` raises for a batch, it is run again order
by order and the orders it still raises on are dead-lettered as ``hook_failed``; if ``observe``
raises, the error is logged and counted.

A hook that hangs never stops the loop either. Hooks run on a thread of their own
(:class:`HookRunner`), and all of a batch's hook calls share one deadline,
``TRIAGE_PROCESSING_DEADLINE_MS`` (at most half of ``max.poll.interval.ms``, so the worker is
never evicted from its group for being slow). Orders a ``check`` has not finished by then are
dead-lettered as ``timeout``; an ``observe`` that overruns is logged and counted. A call that
overran keeps running (Python cannot stop a thread) and is abandoned: the hook's factory is
called again for a fresh instance, which checks the later batches, so a call that hangs costs
only the orders it was given (a hook that hangs on one order costs that order's batch) and the
orders behind it are checked and scored as usual. An instance is never called again while a
call of its own is running, so hooks never run concurrently with themselves and need not be
thread-safe (state shared between instances, such as class attributes, is shared with the
abandoned call still running). A factory must return a new instance each call: one that
returns an instance already in use, or raises 3 times in a row, is not called again. At most
:data:`MAX_ABANDONED` abandoned calls of one hook may run at once; beyond that (or for a hook
made without a factory) later batches wait for the oldest within their own deadline, as a hook
that hangs on everything cannot be worked around.
"""

from __future__ import annotations

__all__ = ["CheckHook", "ObserveHook", "Rejection", "ScoredBatch"]

import functools
import importlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import structlog

from triage.bus.errors import BadRecord
from triage.bus.settings import SettingsError
from triage.model.features import FeatureBatch
from triage.model.orders import OrderColumns
from triage.scoring import metrics
from triage.scoring.settings import ScoringSettings


@dataclass(frozen=True)
class Rejection:
    index: int     # position of the order in the list given to check()
    reason: str    # short and machine-readable: the dead-letter reason and metric label
    message: str   # for people


@dataclass(frozen=True)
class ScoredBatch:
    orders: OrderColumns
    features: FeatureBatch
    recommendations: list[str]
    probabilities: np.ndarray      # float32, one column per model class
    published_at_ms: list[int]     # Kafka timestamps of the consumed order records
    scored_at_ms: int


@runtime_checkable
class CheckHook(Protocol):
    def check(self, orders: list[dict[str, Any]]) -> Iterable[Rejection]: ...


@runtime_checkable
class ObserveHook(Protocol):
    def observe(self, batch: ScoredBatch) -> None: ...


def hook_name(hook: object) -> str:
    return getattr(hook, "name", type(hook).__name__)


def load_hooks(spec: str, settings: ScoringSettings) -> list[HookRunner]:
    """Instantiate the hooks named in ``spec`` (``module:factory`` items, comma-separated), each
    in a :class:`HookRunner` that can call its factory again for a fresh instance. Raises
    SettingsError for an item that cannot be loaded or is not a hook."""
    hooks: list[HookRunner] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attribute = item.partition(":")
        if not attribute:
            raise SettingsError(f"hook {item!r} is not in module:factory form")
        try:
            factory: Callable[[ScoringSettings], object] = getattr(
                importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise SettingsError(f"hook {item!r} cannot be loaded: {exc}") from None
        hook = factory(settings)
        if not isinstance(hook, CheckHook | ObserveHook):
            raise SettingsError(f"hook {item!r} has neither check() nor observe()")
        hooks.append(HookRunner(hook, renew=functools.partial(factory, settings)))
    return hooks


class HookTimeout(BadRecord):
    """A hook call did not return by the batch's deadline: its orders are dead-lettered as
    ``timeout``."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class _Call:
    def __init__(self, function: Callable[[Any], Any], argument: Any) -> None:
        self.function, self.argument = function, argument
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            result = self.function(self.argument)
            # A check() may return a generator: its work must happen here, within the deadline.
            self.result = list(result) if result is not None else None
        except Exception as exc:  # handed to the caller, which decides
            self.error = exc
        except BaseException as exc:  # SystemExit and the like must not stop the worker
            self.error = RuntimeError(f"{type(exc).__name__}: {exc}")
        finally:
            self.done.set()


class HookRunner:
    """Runs one hook's calls on a daemon thread each, so that the scorer can give up on a call
    at a deadline without interrupting it, and, with ``renew`` (the hook's factory), go on with
    a fresh instance while the abandoned call runs (see the module docstring)."""

    def __init__(self, hook: object, renew: Callable[[], object] | None = None) -> None:
        self.hook = hook
        self.name = hook_name(hook)
        self._renew = renew
        self._overrun: _Call | None = None
        self._abandoned: list[tuple[_Call, object]] = []  # (the call, its instance)
        self._renewing: _Call | None = None  # a factory call not returned yet
        self._renewal_failures = 0

    @property
    def busy(self) -> bool:
        """True while a call that overran its deadline is still running on the current
        instance."""
        return self._overrun is not None and not self._overrun.done.is_set()

    @property
    def abandoned(self) -> int:
        """Calls that overran on earlier instances and are still running."""
        self._abandoned = [(c, h) for c, h in self._abandoned if not c.done.is_set()]
        return len(self._abandoned)

    def call(self, method: str, argument: Any, deadline: float) -> Any:
        """``hook.<method>(argument)`` (a returned iterable as a list), by ``deadline``
        (``time.monotonic()`` seconds). Raises what the hook raised, or :class:`HookTimeout`
        if it has not returned by then, or if an earlier call that overran has not returned by
        then and no fresh instance could take over."""
        if self._overrun is not None:
            wait = self._overrun.done.is_set() or not self._take_over(deadline)
            if wait and not self._overrun.done.wait(max(0.0, deadline - time.monotonic())):
                raise HookTimeout(f"hook {self.name} is still running a call that overran an "
                                  "earlier batch's deadline")
            self._overrun = None
        call = _Call(getattr(self.hook, method), argument)
        threading.Thread(target=call.run, name=f"hook-{self.name}", daemon=True).start()
        if not call.done.wait(max(0.0, deadline - time.monotonic())):
            self._overrun = call
            raise HookTimeout(f"hook {self.name}.{method} did not return within the batch's "
                              "processing deadline (TRIAGE_PROCESSING_DEADLINE_MS)")
        if call.error is not None:
            raise call.error
        return call.result

    def _take_over(self, deadline: float) -> bool:
        """Abandon the overrunning call and make a fresh instance with the factory (itself
        under ``deadline``; a factory call still running is waited for by the next batch, not
        started again); False if there is no factory, too many abandoned calls run, or the
        factory has not returned, failed, or returned an instance already in use. A factory
        that failed :data:`MAX_RENEWAL_FAILURES` times in a row is not called again."""
        if self._renew is None or self.abandoned >= MAX_ABANDONED:
            return False
        if self._renewing is None:
            renew = self._renew
            self._renewing = _Call(lambda _: [renew()], None)
            threading.Thread(target=self._renewing.run, name=f"hook-{self.name}-renew",
                             daemon=True).start()
        made = self._renewing
        if not made.done.wait(max(0.0, deadline - time.monotonic())):
            return False
        self._renewing = None
        log = structlog.get_logger("hooks")
        assert self._overrun is not None
        fresh = made.result[0] if made.error is None else None
        if fresh is None or fresh is self.hook or any(fresh is h for _, h in self._abandoned):
            self._renewal_failures += 1
            reason = (f"{type(made.error).__name__}: {made.error}" if made.error is not None
                      else "the factory returned an instance already in use")
            if self._renewal_failures >= MAX_RENEWAL_FAILURES or made.error is None:
                self._renew = None  # waited for from now on, as a hook without a factory
            log.warning("hook_renewal_failed", hook=self.name, error=reason,
                        renewing=self._renew is not None)
            return False
        self._renewal_failures = 0
        self._abandoned.append((self._overrun, self.hook))
        self.hook = fresh
        metrics.HOOK_RENEWALS.labels(self.name).inc()
        log.warning("hook_renewed", hook=self.name, abandoned_running=len(self._abandoned),
                    note="a call overran the processing deadline and still runs; a fresh "
                         "instance from the hook's factory checks the later batches")
        return True


# Abandoned calls of one hook allowed to run at once (each holds a thread): past this, a hook
# that hangs on every call is waited for instead of renewed without end.
MAX_ABANDONED = 4
# A factory that raises this many times in a row is not called again (one that registers a
# metric, say, fails the same way each time).
MAX_RENEWAL_FAILURES = 3
