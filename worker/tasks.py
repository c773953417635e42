"""Celery tasks (thin wrappers around worker.scoring) and the worker heartbeat."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_failure, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite

from server.config import get_settings
from server.db import forget_engines, session_factory_for, utcnow
from server.models import WorkerHeartbeat
from worker.celery_app import SCORE_TASK, TRANSFER_TASK, celery_app
from worker.scoring import Outcome, record_hard_time_limit, run_scoring, run_transfer

log = logging.getLogger(__name__)
_stop = threading.Event()


@celery_app.task(name=SCORE_TASK, bind=True)
def score_submission(self: Any, submission_id: str) -> str:
    """Score one submission by id; safe to run twice (the row's state decides)."""
    settings = get_settings()
    outcome: Outcome = run_scoring(
        submission_id,
        settings=settings,
        session_factory=session_factory_for(settings.db_url),
        worker_name=str(self.request.hostname or "worker"),
    )
    return outcome.value


@celery_app.task(name=TRANSFER_TASK)
def transfer_attack(submission_id: str) -> int:
    """Add a scored attack batch to the transfer matrices it feeds; safe to run twice."""
    settings = get_settings()
    return run_transfer(
        submission_id, settings=settings, session_factory=session_factory_for(settings.db_url)
    )


@task_failure.connect
def _on_hard_time_limit(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    **_: Any,
) -> None:
    """The pool killed a scoring process at its hard time limit (this runs in the worker's main
    process): fail the submission now, with cause ``time_limit``."""
    if not isinstance(exception, TimeLimitExceeded) or getattr(sender, "name", None) != SCORE_TASK:
        return
    if not args or task_id is None:
        return
    limit = exception.args[0] if exception.args else None
    settings = get_settings()
    try:
        record_hard_time_limit(
            str(args[0]),
            task_id,
            float(limit) if isinstance(limit, int | float) else None,
            session_factory=session_factory_for(settings.db_url),
        )
    except Exception:  # the lease runs out instead and the sweep takes over
        log.warning("could not record the hard time limit of task %s", task_id, exc_info=True)


def _beat(hostname: str) -> None:
    settings = get_settings()
    factory = session_factory_for(settings.db_url)
    values = {"hostname": hostname, "queues": settings.worker_queues, "pid": os.getpid()}
    while True:
        try:
            with factory() as session:
                dialect = session.get_bind().dialect.name
                insert = (postgresql if dialect == "postgresql" else sqlite).insert
                now = utcnow()
                statement = insert(WorkerHeartbeat).values(
                    **values, started_at=now, last_seen_at=now
                )
                session.execute(
                    statement.on_conflict_do_update(
                        index_elements=["hostname"], set_={"last_seen_at": now, "pid": os.getpid()}
                    )
                )
                session.commit()
        except Exception:  # the database may be restarting; try again next beat
            log.warning("worker heartbeat failed", exc_info=True)
        if _stop.wait(settings.worker_heartbeat_s):
            return


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    hostname = str(getattr(sender, "hostname", None) or f"worker@{os.getpid()}")
    threading.Thread(target=_beat, args=(hostname,), name="heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(sender: Any = None, **_: Any) -> None:
    _stop.set()
    hostname = getattr(sender, "hostname", None)
    if hostname:
        settings = get_settings()
        with session_factory_for(settings.db_url)() as session:
            session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == hostname))
            session.commit()


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    """A forked pool process: own database connections, the configured torch threads, and the
    grading niceness (the API on the same machine answers first)."""
    forget_engines()
    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.worker_nice:
        os.nice(settings.worker_nice)
