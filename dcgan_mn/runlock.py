"""One process per run folder: an exclusive claim held for the run's lifetime.

A new run creates its folder with one ``mkdir`` (never "check, then create"), so of two
processes starting the same ``--run-name`` exactly one gets it. Every run, new or resumed, then
holds ``fcntl.flock`` on ``<run>/run.lock`` until it ends; the file records the holder (host,
pid, start time). A second process on the folder stops with one line naming the holder, before
it writes anything. The kernel releases a flock when its process dies, however it dies, so a
lock left by a killed run is simply taken over (with a message naming the dead holder).

What this does not protect: ``flock`` is advisory and local. On NFS it is emulated with POSIX
locks on Linux (>= 2.6.12) and works between clients only when the server supports locking;
on other network filesystems (some FUSE / object-store mounts) two hosts may both get the lock.
Do not run one run folder from two hosts on such filesystems.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Union

from .errors import RunFolderBusy

__all__ = ["RunFolderBusy", "RunLock"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunFolder(run).claim():`` holds the folder's exclusive lock on its lock file
    (``<run>/run.lock``), or raises RunFolderBusy."""

    def __init__(self, lock_file: Union[str, Path]) -> None:
        self.path = Path(lock_file)
        self._fd: Optional[int] = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            raise RunFolderBusy(
                f"{self.path.parent}: in use by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                f"(since {h.get('started', '?')}); stop that run first"
            ) from None
        previous = self.holder()  # cleared on release: a record left means its holder died
        if previous.get("pid"):
            dead = previous.get("host") == socket.gethostname() and not _alive(int(previous["pid"]))
            print(
                f"{self.path.parent}: taking over the run folder from pid {previous['pid']} on "
                f"{previous.get('host', '?')}, which ended without releasing it"
                + (" (no longer running)" if dead else ""),
                file=sys.stderr,
            )
        record = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)  # no holder any more
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # an exception between acquire and release, in-process
        try:
            self.release()
        except Exception:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
