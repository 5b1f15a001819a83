"""Capture of what the engine logs through ``twisted.logger`` while a block runs."""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer


@implementer(ILogObserver)
class LogCapture:
    """Collects the events sent to the global log publisher while the ``with`` block is open.

    ``events`` keeps the raw events and ``lines`` their formatted texts (events without a message
    left out); ``texts(namespace, level)`` formats every event of a namespace or level (an event
    without a message gives ``""``, so a count of errors is exact), ``find(fragment)`` searches
    ``lines``.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        text = formatEvent(event)
        if text:
            self.lines.append(text)

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def texts(self, namespace: str | None = None, level: LogLevel | None = None) -> list[str]:
        """Every event formatted, only those of ``namespace`` / ``level`` when given."""
        return [
            formatEvent(event) for event in self.events
            if namespace in (None, event.get("log_namespace")) and level in (None, event.get("log_level"))
        ]

    def find(self, fragment: str) -> list[str]:
        """Formatted messages that contain ``fragment``."""
        return [line for line in self.lines if fragment in line]
