"""Health of the service: database, broker, live workers and queue depth."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta

from kombu import Connection
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from server.config import Settings
from server.db import utcnow
from server.models import Submission, SubmissionStatus, WorkerHeartbeat
from server.schemas import ComponentHealth, HealthPublic, QueuePublic, WorkerPublic


def _broker(settings: Settings) -> ComponentHealth:
    try:
        with Connection(settings.broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return ComponentHealth(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])
    return ComponentHealth(ok=True)


def live_workers(session: Session, settings: Settings) -> Sequence[WorkerHeartbeat]:
    """Workers whose heartbeat is fresher than ``settings.worker_stale_after_s``."""
    cutoff = utcnow() - timedelta(seconds=settings.worker_stale_after_s)
    return session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.last_seen_at >= cutoff)
        .order_by(WorkerHeartbeat.hostname)
    ).all()


def worker_queues(worker: WorkerHeartbeat) -> set[str]:
    """The queues a worker consumes (its heartbeat stores them comma-separated)."""
    return {name.strip() for name in worker.queues.split(",") if name.strip()}


def submission_counts(session: Session) -> dict[tuple[str, SubmissionStatus], int]:
    """How many submissions each (queue, status) pair holds right now."""
    rows = session.execute(
        select(Submission.queue, Submission.status, func.count()).group_by(
            Submission.queue, Submission.status
        )
    )
    return {(queue, status): count for queue, status, count in rows}


def known_queues(seen: Iterable[str]) -> list[str]:
    """The Celery queues (``cpu``, ``gpu``) plus any other name found in ``seen``, sorted."""
    from worker.celery_app import QUEUES

    return sorted({*QUEUES, *seen})


def health(*, session: Session, settings: Settings) -> HealthPublic:
    """Check each component; ``status`` is ``ok`` only when all are up and a worker is alive."""
    try:
        session.execute(text("SELECT 1"))
        database = ComponentHealth(ok=True)
    except Exception as exc:
        return HealthPublic(
            status="down",
            database=ComponentHealth(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300]),
            broker=_broker(settings),
            workers=[],
            queued=0,
            running=0,
            queues={},
        )
    workers = live_workers(session, settings)
    counts = submission_counts(session)
    queues = {
        queue: QueuePublic(
            queued=counts.get((queue, SubmissionStatus.QUEUED), 0),
            running=counts.get((queue, SubmissionStatus.RUNNING), 0),
            workers=sum(queue in worker_queues(w) for w in workers),
        )
        for queue in known_queues(queue for queue, _ in counts)
    }
    broker = _broker(settings)
    ok = database.ok and broker.ok and bool(workers)
    return HealthPublic(
        status="ok" if ok else "degraded",
        database=database,
        broker=broker,
        workers=[
            WorkerPublic(hostname=w.hostname, queues=w.queues, last_seen_at=w.last_seen_at)
            for w in workers
        ],
        queued=sum(q.queued for q in queues.values()),
        running=sum(q.running for q in queues.values()),
        queues=queues,
    )
