"""Progress of a watched job as one line: redrawn in place on a terminal, throttled in a log."""
from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from userexport.v1 import users_export_pb2 as pb

from .api import status_name


def describe(job: pb.Job) -> str:
    """"processing   42%  420/1,000 users  ~1m05s left": the state a person wants at a glance."""
    return f"{status_name(job.status):<10}  {progress_text(job)}"


def progress_text(job: pb.Job) -> str:
    """"42%  420/1,000 users  ~1m05s left": how far the job is, without its status."""
    parts = [f"{job.percentage_done:>3}%"]
    if job.users_total:
        parts.append(f"{job.users_written:,}/{job.users_total:,} users")
    elif job.users_written:
        parts.append(f"{job.users_written:,} users")
    if job.status == pb.Job.PROCESSING and job.HasField("time_left_seconds"):
        parts.append(f"~{format_duration(job.time_left_seconds)} left")
    return "  ".join(parts)


def format_duration(seconds: int) -> str:
    """Compact and coarse enough for an estimate: 42s, 3m05s, 2h07m."""
    seconds = max(0, seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render(job: pb.Job, width: int = 30) -> str:
    """A bar of `width` cells followed by describe(job)."""
    filled = width * min(max(job.percentage_done, 0), 100) // 100
    return f"[{'#' * filled}{'-' * (width - filled)}] {describe(job)}"


class ProgressBar:
    """Feed it each watched Job; it decides what reaches the stream.

    On a TTY one line is redrawn with \\r. Elsewhere (CI logs, pipes) a line is written on every
    status change and at most once per `interval` seconds otherwise, so logs stay short.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        width: int = 30,
        interval: float = 5.0,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._width = width
        self._interval = interval
        self._tty = stream.isatty() if tty is None else tty
        self._clock = clock
        self._last_line = ""
        self._last_status: pb.Job.Status | None = None
        self._last_written_at = float("-inf")

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, job: pb.Job) -> None:
        line = render(job, self._width)
        if line == self._last_line:
            return
        if self._tty:
            # Pad over the remains of a longer previous line.
            self._stream.write("\r" + line.ljust(len(self._last_line)))
        else:
            now = self._clock()
            if job.status == self._last_status and now - self._last_written_at < self._interval:
                return
            self._stream.write(line + "\n")
            self._last_written_at = now
        self._stream.flush()
        self._last_line = line
        self._last_status = job.status

    def close(self) -> None:
        """End the redrawn line so whatever follows starts on its own line."""
        if self._tty and self._last_line:
            self._stream.write("\n")
            self._stream.flush()
            self._last_line = ""
