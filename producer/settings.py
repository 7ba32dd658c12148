"""The producer's settings (producer/): :class:`ProducerSettings`, what ``triage replay`` and
``triage produce`` read. The machinery, and the flat ``TRIAGE_*`` variables, are
bus/settings.py's."""

from __future__ import annotations

from dataclasses import dataclass

from triage.bus.settings import SettingsBase, section
from triage.model.settings import DataSettings


@dataclass(frozen=True)
class ProducerSettings(SettingsBase):
    """The connection, the topics, and the input files' encoding."""

    data: DataSettings = section(DataSettings)
