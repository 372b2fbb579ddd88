"""Helpers the test modules share."""

from __future__ import annotations

import variants


def why_not(entry: variants.Entry, point: variants.Point) -> str | None:
    """The entry's reasons for refusing ``point`` as a results row holds them (joined), None if none."""
    return "; ".join(entry.not_supported_reasons(point)) or None
