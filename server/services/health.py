"""Health of the service: database, broker, live workers and queue depth."""

from __future__ import annotations

from datetime import timedelta

from kombu import Connection
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from server.config import Settings
from server.db import utcnow
from server.models import Submission, SubmissionStatus, WorkerHeartbeat
from server.schemas import ComponentHealth, HealthPublic, WorkerPublic


def _broker(settings: Settings) -> ComponentHealth:
    try:
        with Connection(settings.broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return ComponentHealth(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])
    return ComponentHealth(ok=True)


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
        )
    cutoff = utcnow() - timedelta(seconds=settings.worker_stale_after_s)
    workers = session.scalars(
        select(WorkerHeartbeat)
        .where(WorkerHeartbeat.last_seen_at >= cutoff)
        .order_by(WorkerHeartbeat.hostname)
    ).all()
    counts: dict[SubmissionStatus, int] = {
        status: count
        for status, count in session.execute(
            select(Submission.status, func.count())
            .where(Submission.status.in_([SubmissionStatus.QUEUED, SubmissionStatus.RUNNING]))
            .group_by(Submission.status)
        )
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
        queued=counts.get(SubmissionStatus.QUEUED, 0),
        running=counts.get(SubmissionStatus.RUNNING, 0),
    )
