"""Per-batch processing hooks: add checks to the scorer without editing its loop.

A hook is an object with either or both of these methods:

* ``check(orders: list[dict]) -> Iterable[Rejection]``: runs on every decoded batch before
  scoring. Each :class:`Rejection` sends that order to the dead-letter topic with its reason;
  the rest of the batch is scored. The built-in validation (:mod:`consumer.validation`) is
  such a hook.
* ``observe(batch: ScoredBatch) -> None``: runs after the batch is scored and its predictions
  are produced, for latency checks, data thresholds, extra metrics or alerts. It cannot
  reject anything.

Register hooks with ``TRIAGE_HOOKS=package.module:factory,other.module:factory``. Each factory is
called once per worker with the :class:`~bus.settings.Settings` and returns the hook. Example::

    # mycompany/hooks.py
    class BigSpender:
        def __init__(self, settings): ...
        def check(self, orders):
            return [Rejection(i, "blocked_customer", "on the block list")
                    for i, o in enumerate(orders) if o["customer_id"] in BLOCKED]

A hook that raises never stops the loop: if ``check`` raises for a batch, it is run again order
by order and the orders it still raises on are dead-lettered as ``hook_failed``; if ``observe``
raises, the error is logged and counted.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bus.settings import Settings, SettingsError
from model.features import FeatureBatch
from model.orders import OrderColumns


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


def load_hooks(spec: str, settings: Settings) -> list[object]:
    """Instantiate the hooks named in ``spec`` (``module:factory`` items, comma-separated)."""
    hooks = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attribute = item.partition(":")
        if not attribute:
            raise SettingsError(f"hook {item!r} is not in module:factory form")
        try:
            factory: Callable[[Settings], object] = getattr(
                importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise SettingsError(f"hook {item!r} cannot be loaded: {exc}") from None
        hook = factory(settings)
        if not isinstance(hook, CheckHook | ObserveHook):
            raise SettingsError(f"hook {item!r} has neither check() nor observe()")
        hooks.append(hook)
    return hooks
