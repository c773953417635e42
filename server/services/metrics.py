"""Prometheus metrics in the text exposition format 0.0.4, computed from the database at scrape
time: the API and the workers are separate processes (often machines), and the database is what
they share, so any API process answers for the whole service."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.config import Settings
from server.models import FailureCause, Submission, SubmissionStatus
from server.services.health import known_queues, live_workers, submission_counts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 10800, 21600)
"""Upper bounds of the task duration histogram: attack batches take seconds, defense
evaluations up to hours (the default defense time limit is 3 h)."""

OUTCOMES = (SubmissionStatus.SCORED, SubmissionStatus.FAILED)
UNKNOWN_CAUSE = "unknown"
"""The cause label of failures recorded without one."""

Labels = Mapping[str, str]


@dataclass
class Family:
    """One metric: its samples are (name suffix, labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, labels, value))


def _escape(value: str, *, quote: bool = True) -> str:
    """Backslash, newline (and in label values, double quote) escaped as the format wants."""
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace('"', '\\"') if quote else value


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The exposition text of ``families``: HELP and TYPE lines, then one line per sample."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape(family.help, quote=False)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            pairs = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
            selector = f"{{{pairs}}}" if pairs else ""
            lines.append(f"{family.name}{suffix}{selector} {_number(value)}")
    return "\n".join(lines) + "\n"


def _seconds(started_at: datetime, finished_at: datetime) -> float:
    return max(0.0, (finished_at - started_at).total_seconds())


def _durations(session: Session) -> dict[tuple[str, SubmissionStatus], list[float]]:
    """Seconds from claim to finish of every scored or failed submission, by (queue, outcome)."""
    rows = session.execute(
        select(Submission.queue, Submission.status, Submission.started_at, Submission.finished_at)
        .where(
            Submission.status.in_(OUTCOMES),
            Submission.started_at.is_not(None),
            Submission.finished_at.is_not(None),
        )
        .execution_options(yield_per=1000)
    )
    durations: dict[tuple[str, SubmissionStatus], list[float]] = {}
    for queue, status, started_at, finished_at in rows:
        if started_at is not None and finished_at is not None:  # always, by the query
            durations.setdefault((queue, status), []).append(_seconds(started_at, finished_at))
    return durations


def _duration_histogram(
    queues: list[str], durations: Mapping[tuple[str, SubmissionStatus], list[float]]
) -> Family:
    family = Family(
        "autograder_task_duration_seconds",
        "histogram",
        "Seconds from the claim of a submission to its result (finished_at - started_at), "
        "by queue and outcome.",
    )
    for queue in queues:
        for outcome in OUTCOMES:
            values = sorted(durations.get((queue, outcome), []))
            labels = {"queue": queue, "outcome": outcome.value}
            for bound in (*DURATION_BUCKETS_S, math.inf):
                family.add(
                    bisect.bisect_right(values, bound), "_bucket", **labels, le=_number(bound)
                )
            family.add(math.fsum(values), "_sum", **labels)
            family.add(len(values), "_count", **labels)
    return family


def collect(*, session: Session, settings: Settings) -> list[Family]:
    """Every metric, read from the database now."""
    counts = submission_counts(session)
    queues = known_queues(queue for queue, _ in counts)
    depth = Family("autograder_queue_depth", "gauge", "Submissions waiting to be scored, by queue.")
    running = Family("autograder_running", "gauge", "Submissions being scored, by queue.")
    for queue in queues:
        depth.add(counts.get((queue, SubmissionStatus.QUEUED), 0), queue=queue)
        running.add(counts.get((queue, SubmissionStatus.RUNNING), 0), queue=queue)
    workers = Family(
        "autograder_workers_alive",
        "gauge",
        "Workers whose heartbeat is fresher than AUTOGRADER_WORKER_STALE_AFTER_S.",
    )
    workers.add(len(live_workers(session, settings)))
    submissions = Family(
        "autograder_submissions_total",
        "gauge",
        "Submissions in the database by status and queue (queued and running ones move on, so "
        "this is a gauge; the final statuses only grow).",
    )
    for status in SubmissionStatus:
        for queue in queues:
            submissions.add(counts.get((queue, status), 0), status=status.value, queue=queue)
    failures = Family(
        "autograder_failures_total", "counter", "Failed submissions by cause (none is charged)."
    )
    by_cause: dict[str, int] = {
        (cause.value if cause is not None else UNKNOWN_CAUSE): count
        for cause, count in session.execute(
            select(Submission.failure_cause, func.count())
            .where(Submission.status == SubmissionStatus.FAILED)
            .group_by(Submission.failure_cause)
        )
    }
    for cause in (*(c.value for c in FailureCause), UNKNOWN_CAUSE):
        if cause != UNKNOWN_CAUSE or cause in by_cause:
            failures.add(by_cause.get(cause, 0), cause=cause)
    return [
        depth,
        running,
        workers,
        submissions,
        _duration_histogram(queues, _durations(session)),
        failures,
    ]


def metrics_text(*, session: Session, settings: Settings) -> str:
    """The ``/metrics`` answer: every metric in the Prometheus text format 0.0.4."""
    return render(collect(session=session, settings=settings))
