"""``triage bench``: the scorer measured side by side with Kafka passthrough and per-message
scoring, on the same machine, in one run (see docs/benchmarks.md).

Imported only by ``triage/cli.py``. Its worker processes (``python -m triage.bench.workers``)
run the two comparison configurations; the scorer itself runs as shipped,
``python -m triage.consumer.worker``.
"""
