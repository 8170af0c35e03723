"""The progress line: what it says, and how often it reaches a terminal or a log."""
from __future__ import annotations

import io

from userexport.client.progress import ProgressBar, describe, format_duration, render
from userexport.v1 import users_export_pb2 as pb


def job(
    status: pb.Job.Status, percent: int = 0, written: int = 0, total: int = 0, left: int | None = None
) -> pb.Job:
    return pb.Job(
        id="job_0123456789abcdef", status=status, percentage_done=percent,
        users_written=written, users_total=total, time_left_seconds=left,
    )


def test_format_duration() -> None:
    durations = [format_duration(s) for s in (-1, 0, 42, 65, 3599, 7620)]
    assert durations == ["0s", "0s", "42s", "1m05s", "59m59s", "2h07m"]


def test_describe() -> None:
    assert describe(job(pb.Job.PENDING)) == "pending       0%"
    running = job(pb.Job.PROCESSING, 42, 420, 1000, 65)
    assert describe(running) == "processing   42%  420/1,000 users  ~1m05s left"
    assert describe(job(pb.Job.COMPLETED, 100, 1000, 1000, 0)) == "completed   100%  1,000/1,000 users"


def test_render_bar() -> None:
    assert render(job(pb.Job.PROCESSING, 50, 5, 10), width=10).startswith("[#####-----] processing")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_redraws_one_line() -> None:
    out = FakeTerminal()
    with ProgressBar(out, width=4) as bar:
        bar.update(job(pb.Job.PROCESSING, 50, 5, 10, 100))
        bar.update(job(pb.Job.PROCESSING, 50, 5, 10, 100))  # unchanged: not redrawn
        bar.update(job(pb.Job.COMPLETED, 100, 10, 10))
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    first, second = text.split("\r")[1:]
    assert len(second.rstrip("\n")) >= len(first)  # the longer first line is fully overwritten


def test_log_gets_status_changes_and_throttled_progress() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = ProgressBar(out, interval=5, clock=lambda: now[0])
    bar.update(job(pb.Job.PENDING))
    for second, percent in enumerate(range(10, 100, 10), start=1):
        now[0] = float(second)
        bar.update(job(pb.Job.PROCESSING, percent, percent, 100))
    now[0] = 9.5
    bar.update(job(pb.Job.COMPLETED, 100, 100, 100))
    bar.close()
    lines = out.getvalue().splitlines()
    statuses = [line.split("] ")[1].split()[0] for line in lines]
    assert statuses == ["pending", "processing", "processing", "completed"]
    assert "10%" in lines[1] and "60%" in lines[2]
