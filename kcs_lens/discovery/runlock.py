"""One writer per run directory: an OS file lock (``flock``) on ``RUN/.lock`` holding the writer's pid.

:class:`RunLock` is taken by every process that writes a run (``discover``, ``--resume``, sweep
workers) through :meth:`kcs_lens.discovery.rundir.RunDir.lock`. The kernel releases it when the process ends
in any way (``kill -9`` included), so a stale lock file never blocks anyone: only a live holder
counts. Readers (``evaluate``, ``report``, ...) call :func:`lock_holder` to say that a run is
still running; they never wait. The lock file is left in place (removing it would race with a
process that is about to lock it); its content (the pid) is informative only.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from kcs_lens.errors import OutputError, RunError
from kcs_lens.files import file_mode

# A reader probes with a shared lock for microseconds; a writer retries this long before it
# concludes that another writer holds the directory.
_RETRY_S = 0.5


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


def _holder_text(pid: int | None) -> str:
    return f"pid {pid}" if pid is not None else "pid unknown"


class RunLock:
    """An exclusive lock on ``path`` for this process (``with RunLock(p).acquire(run_dir): ...``)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, run_dir: str | os.PathLike[str]) -> "RunLock":
        """Take the lock or raise a RunError naming the process that holds it."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as e:
            raise OutputError(f"{run_dir}: cannot create the lock file {self.path.name} ({e.strerror or e})") from None
        deadline = time.monotonic() + _RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise RunError(
                        f"{run_dir}: another kcs-lens process ({_holder_text(pid)}) is writing this run directory; "
                        "wait for it to finish or stop it, or choose another --out"
                    ) from None
                time.sleep(0.02)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informative; the lock itself is held
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(path: str | os.PathLike[str]) -> int | None:
    """The pid of the live process holding the lock at ``path`` (0 if unknown), or None when no
    process holds it (never locked, or its writer has exited)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            return 0 if pid is None else pid
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
