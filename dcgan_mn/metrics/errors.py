"""The one error type of the metrics: a bad evaluation input, as one line."""

from __future__ import annotations

__all__ = ["MetricsError"]


class MetricsError(ValueError):
    """A bad evaluation input; the message is one line naming the flag or path and the value."""

