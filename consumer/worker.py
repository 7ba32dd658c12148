"""One scorer worker process: ``python -m consumer.worker --model DIR --reference DIR``.

Settings come from the ``TRIAGE_*`` environment the supervisor passes down. Exit status: 0 after
a requested stop (SIGTERM/SIGINT: finish the batch, commit, leave the group), 1 after an
infrastructure failure (the supervisor restarts the worker), 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import structlog
from confluent_kafka import KafkaException

from bus.embedded import BrokerNotFound
from bus.logs import configure_logging
from bus.settings import Settings, SettingsError
from consumer import metrics
from consumer.commit import InfrastructureError
from consumer.hooks import load_hooks
from consumer.scorer import Scorer
from model import artifact
from model.reference import ReferenceDataError, ReferenceTables
from schemas.codec import RegistryUnavailable

EXIT_CONFIG_ERROR = 2  # the supervisor does not restart a worker that exits with this


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="consumer.worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--worker-id", default="0")
    parser.add_argument("--status-file", type=Path,
                        help="where to keep this worker's assigned partitions (JSON)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    configure_logging(settings.log_format, settings.log_level)
    log = structlog.get_logger("worker").bind(worker=args.worker_id)
    try:
        model = artifact.load(args.model)
        reference = ReferenceTables.load(args.reference)
        scorer = Scorer(settings, model, reference, worker_id=args.worker_id,
                        status_file=args.status_file,
                        extra_hooks=load_hooks(settings.hooks, settings))
        if settings.metrics_port:
            port = settings.metrics_port + int(args.worker_id)
            metrics.serve(port)
            log.info("metrics_serving", port=port)
    except (artifact.ArtifactError, ReferenceDataError, BrokerNotFound, SettingsError,
            OSError) as exc:
        log.error("worker_config_error", error=str(exc))
        return EXIT_CONFIG_ERROR

    def stop(signum: int, _frame: object) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        scorer.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        scorer.run()
    except (InfrastructureError, KafkaException, RegistryUnavailable) as exc:
        log.error("worker_failed", error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
