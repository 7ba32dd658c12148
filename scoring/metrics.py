"""Prometheus metrics of the scoring core (scoring/): predictions, dead letters, hooks,
reference streams, corrections, shadow scoring, model refusals. Registered in whatever process
scores (a Kafka worker, the HTTP gateway) and served on its /metrics; docs/operating.md lists
them with their meaning; deploy/prometheus/ and deploy/grafana/ use them by these names. The
worker's own (consumption, lag, partitions, batches) are in consumer/metrics.py."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

PREDICTIONS = Counter("triage_predictions_total", "Predictions produced.", ["recommendation"])
DEAD_LETTERS = Counter("triage_dead_letters_total", "Records sent to the dead-letter topic.",
                       ["reason"])
HOOK_ERRORS = Counter("triage_hook_errors_total", "Exceptions raised by processing hooks.",
                      ["hook"])
HOOK_TIMEOUTS = Counter("triage_hook_timeouts_total",
                        "Hook calls that did not return within the batch's processing deadline.",
                        ["hook"])
HOOK_RENEWALS = Counter("triage_hook_renewals_total",
                        "Fresh hook instances made by the hook's factory while a call that "
                        "overran the processing deadline still runs (scoring/hooks.py).",
                        ["hook"])
UNKNOWN_ZIPS = Counter("triage_unknown_zip_codes_total",
                       "Orders to a zip code the reference data does not know (scored as not "
                       "served).")
REFERENCE_APPLIED = Counter("triage_reference_events_total",
                            "Reference events applied to the worker's tables.", ["stream"])
REFERENCE_LATE = Counter("triage_reference_late_events_total",
                         "Reference events (stock and zips: keys) that arrived after an order "
                         "they apply to was scored; each such order is checked for a "
                         "correction.", ["stream"])
REFERENCE_BEYOND_RETENTION = Counter(
    "triage_reference_beyond_retention_total",
    "Late reference events at or before an order no longer kept for corrections "
    "(TRIAGE_CORRECTION_RETENTION_S): orders they apply to may go uncorrected.", ["stream"])
REFERENCE_MISPLACED = Counter("triage_reference_misplaced_total",
                              "Co-partitioned reference records (payments) on a partition the "
                              "documented partitioner (murmur2 of the key) would not choose; "
                              "joined right all the same.", ["stream"])
CORRECTIONS = Counter("triage_corrections_total",
                      "Corrected predictions published (revision 2 and up), by the reference "
                      "stream whose late events changed the features.", ["stream"])
REFERENCE_DEAD_LETTERS = Counter("triage_reference_dead_letters_total",
                                 "Reference records sent to the reference dead-letter topic.",
                                 ["stream", "reason"])
REFERENCE_WAIT_EXPIRED = Counter("triage_reference_wait_expired_total",
                                 "Orders scored because TRIAGE_REFERENCE_MAX_WAIT_MS ran out.")
WINDOWED_WAIT_EXPIRED = Counter(
    "triage_windowed_wait_expired_total",
    "Orders scored without the feature stage's answer because TRIAGE_REFERENCE_MAX_WAIT_MS "
    "ran out (windowed_unknown says wait_expired; a correction follows the answer).")
WAITING_ORDERS = Gauge("triage_waiting_orders",
                       "Orders consumed and waiting for the reference streams to pass them.")
MODEL_REFUSALS = Counter("triage_model_refusals_total",
                         "Promoted model versions this worker could not load (missing, or a "
                         "file changed after training); it kept its model.")
SHADOW_PREDICTIONS = Counter("triage_shadow_predictions_total",
                             "Orders the shadow model version scored (to the shadow topic).")
SHADOW_AGREEMENTS = Counter("triage_shadow_agreements_total",
                            "Shadow predictions with the active model's recommendation; "
                            "agreement = this / triage_shadow_predictions_total.")
SHADOW_AGREEMENT = Gauge("triage_shadow_agreement_ratio",
                         "Share of the orders this worker scored with the current shadow "
                         "version on which it agreed with the active one (0..1).")
SHADOW_ERRORS = Counter("triage_shadow_errors_total",
                        "Batches the shadow model failed to score (the batch itself is scored).")
