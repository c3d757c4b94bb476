"""The one error type of the metrics (defined with the package's other shared errors)."""

from __future__ import annotations

from ..errors import MetricsError

__all__ = ["MetricsError"]
