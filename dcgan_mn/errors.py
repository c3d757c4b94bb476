"""The exceptions that several rooms of the package share, at the bottom of the import graph.

Each is one line for the user: the message names the flag, file or value and what to do. The
CLIs turn them into exit statuses (a ``ConfigError`` is a usage error, exit 2; the rest exit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = [
    "ConfigError",
    "CheckpointError",
    "CheckpointUnreadable",
    "DataError",
    "WriteError",
    "OutFolderError",
    "RunFolderBusy",
    "MetricsError",
    "InceptionWeightsError",
    "InceptionWeightsInvalid",
]


class ConfigError(ValueError):
    """An invalid setting; the message names the CLI flag and the value."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not ours, or incompatible (one-line message)."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file that torch cannot read at all (corrupt, truncated, not a torch file)."""


class DataError(RuntimeError):
    """Training data that cannot be had or read; the message says what to do about it."""


class RunFolderBusy(RuntimeError):
    """The run folder is taken: by another live process, or (new runs) it already exists."""


class MetricsError(ValueError):
    """A bad evaluation input; the message is one line naming the flag or path and the value."""


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights cannot be had or are not what they claim to be."""


class InceptionWeightsInvalid(InceptionWeightsError):
    """A weights file that is there but is not FID Inception weights: fetching cannot fix it."""


class WriteError(OSError):
    """A file could not be written (full disk, no permission, read-only filesystem, quota):
    one line naming the file and the operating system's reason."""

    def __init__(self, path: Union[str, Path], reason: str, code: Optional[int] = None) -> None:
        super().__init__(code, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


class OutFolderError(WriteError):
    """A new run's folder cannot be created under ``--out`` (a file in the way, a read-only,
    immutable or virtual filesystem): one line naming ``--out``, the folder and the reason."""

    def __init__(
        self, out: Union[str, Path], path: Union[str, Path], reason: str, code: Optional[int] = None
    ) -> None:
        super().__init__(path, reason, code)
        self.out = str(out)

    def __str__(self) -> str:
        return f"--out {self.out!r}: cannot create the run folder {self.path}: {self.reason}"
