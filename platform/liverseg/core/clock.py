"""One UTC time format for everything liverseg records (history, decisions, `/model`'s `since`)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    """Now as ISO 8601 UTC with microseconds, e.g. 2026-12-02T10:25:40.123456Z (sorts as text)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
