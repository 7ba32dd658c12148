"""The HTTP gateway's settings (gateway/): its HTTP section, and :class:`GatewaySettings`,
what ``triage serve`` reads (the command line's Settings, triage/settings.py, is one). The
machinery, and the flat ``TRIAGE_*`` variables, are bus/settings.py's."""

from __future__ import annotations

from dataclasses import dataclass

from triage.bus.settings import check_port, section, setting
from triage.model.settings import DataSettings
from triage.scoring.settings import ScoringSettings


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP front door: its port, the view of the topics, the largest body."""

    gateway_port: int = setting(
        8000, "TRIAGE_GATEWAY_PORT", "Port `triage serve` answers HTTP on (`--port`).")
    gateway_view_s: float = setting(
        3600.0, "TRIAGE_GATEWAY_VIEW_S",
        "How far back (seconds) `triage serve` reads the orders, predictions and dead-letter "
        "topics to answer GET /v1/predictions/{order_id}; older orders are 404.")
    gateway_max_body_bytes: int = setting(
        4_194_304, "TRIAGE_GATEWAY_MAX_BODY_BYTES",
        "Largest HTTP request body `triage serve` reads; larger ones get 413. The default "
        "holds the largest batch, 10,000 orders.")


@dataclass(frozen=True)
class GatewaySettings(ScoringSettings):
    """What ``triage serve`` reads: the scoring sections, HTTP and the input files'."""

    http: HttpSettings = section(HttpSettings)
    data: DataSettings = section(DataSettings)

    def check(self) -> None:
        super().check()
        check_port("TRIAGE_GATEWAY_PORT", self.http.gateway_port, off=False)
