"""Enqueue after commit: a broker outage at submit time, or a lost message, loses nothing."""

from __future__ import annotations

import io
import shutil
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kombu import Connection
from sqlalchemy import update

from server.db import utcnow
from server.main import create_app
from server.models import Submission, SubmissionStatus
from server.queue import UNSENT_GRACE_S, enqueue, enqueue_pending, sweep
from tests.conftest import DEFENSE_PHASE, PHASE, SLUG, Account, Artifacts, spec_toml, write_spec
from worker.celery_app import SCORE_TASK, celery_for


def test_submission_accepted_while_broker_is_down_is_sent_later(
    settings, db, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    down = settings.model_copy(update={"celery_broker_url": "redis://127.0.0.1:9/0"})
    buffer = io.BytesIO()
    np.save(buffer, artifacts.eval_set.images, allow_pickle=False)
    with TestClient(create_app(down)) as client:
        response = client.post(
            f"/api/v1/assignments/{SLUG}/phases/{PHASE}/submissions",
            headers=accounts["alice"].headers,
            files={"file": ("adv.npy", buffer.getvalue())},
        )
    assert response.status_code == 202
    with db() as session:
        row = session.get(Submission, response.json()["id"])
        assert row.status is SubmissionStatus.QUEUED and row.task_id is None
        # Just accepted: the request that saved it may still be sending it; left alone.
        assert enqueue_pending(session, settings) == 0
        row.created_at = utcnow() - timedelta(seconds=UNSENT_GRACE_S + 1)
        session.commit()
        assert enqueue_pending(session, down) == 0  # still down: stays pending
        assert enqueue_pending(session, settings) == 1
        session.refresh(row)
        assert row.task_id is not None and row.enqueued_at is not None
        assert enqueue_pending(session, settings) == 0  # sent once only
    with Connection(settings.broker_url) as connection:
        queue = connection.SimpleQueue("cpu")
        message = queue.get(timeout=5)
        assert message.headers["task"] == "worker.tasks.score_submission"
        assert message.payload[0] == [row.id]  # protocol 2: (args, kwargs, embed)
        message.ack()
        queue.close()


def _messages(settings, queue_name: str = "cpu") -> list[str]:
    """Take every message off a broker queue; returns the submission id each one carries."""
    ids = []
    with Connection(settings.broker_url) as connection:
        queue = connection.SimpleQueue(queue_name)
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                break
            ids.append(message.payload[0][0])
            message.ack()
        queue.close()
    return ids


def test_submission_still_queued_long_after_it_was_sent_is_sent_again(
    settings, db, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    buffer = io.BytesIO()
    np.save(buffer, artifacts.eval_set.images, allow_pickle=False)
    with TestClient(create_app(settings)) as client:
        ids = [
            client.post(
                f"/api/v1/assignments/{SLUG}/phases/{PHASE}/submissions",
                headers=accounts["alice"].headers,
                files={"file": ("adv.npy", buffer.getvalue())},
            ).json()["id"]
            for _ in range(2)
        ]
    assert sorted(_messages(settings)) == sorted(ids)  # each sent once at submit time
    lost, running = ids
    long_ago = utcnow() - timedelta(seconds=settings.requeue_queued_after_s + 1)
    with db() as session:
        assert enqueue_pending(session, settings) == 0  # recently sent: left alone
        first_task = session.get(Submission, lost).task_id
        # Both messages are lost (a broker restarted without persistence) and time passes; one
        # submission was claimed by a worker meanwhile.
        session.execute(update(Submission).values(enqueued_at=long_ago))
        session.execute(
            update(Submission)
            .where(Submission.id == running)
            .values(status=SubmissionStatus.RUNNING)
        )
        session.commit()
        assert sweep(session, settings).sent == 1
        row = session.get(Submission, lost)
        session.refresh(row)
        assert row.status is SubmissionStatus.QUEUED and row.task_id != first_task
        assert row.enqueued_at > long_ago
        assert enqueue_pending(session, settings) == 0  # sent again once, not at every sweep
    assert _messages(settings) == [lost]


def _queued_row(db, account: Account, phase: str, queue: str) -> str:
    with db() as session:
        row = Submission(
            user_id=account.user_id,
            assignment_slug=SLUG,
            phase_id=phase,
            status=SubmissionStatus.QUEUED,
            queue=queue,
            file_name="x",
            file_sha256="0" * 64,
            file_size=1,
            batch_path="/nowhere",
        )
        session.add(row)
        session.commit()
        return row.id


@pytest.fixture
def sent(settings, monkeypatch) -> list[dict[str, Any]]:
    """What reaches the Celery app's send_task (name and options), instead of the broker."""
    calls: list[dict[str, Any]] = []

    def send_task(name: str, **options: Any) -> SimpleNamespace:
        calls.append({"name": name, **options})
        return SimpleNamespace(id=f"task-{len(calls)}")

    monkeypatch.setattr(celery_for(settings), "send_task", send_task)
    return calls


@pytest.mark.parametrize(
    ("phase", "queue", "limits", "soft", "hard"),
    [
        (PHASE, "cpu", "", 300, 360),
        (DEFENSE_PHASE, "gpu", "", 3 * 3600, 3 * 3600 + 600),
        (DEFENSE_PHASE, "gpu", "soft_time_limit_s = 50, time_limit_s = 70", 50, 70),
    ],
)
def test_scoring_task_carries_the_phase_time_limits(
    settings, db, accounts, artifacts: Artifacts, sent, phase, queue, limits, soft, hard
) -> None:
    text = spec_toml(artifacts, defense="")
    if limits:
        text = text.replace("max_total = 20 }", f"max_total = 20, {limits} }}")
    write_spec(settings.assignments_dir, text)
    submission_id = _queued_row(db, accounts["alice"], phase, queue)
    with db() as session:
        assert enqueue(session, settings, submission_id)
        assert session.get(Submission, submission_id).task_id == "task-1"
    [call] = sent
    assert call["name"] == SCORE_TASK and call["args"] == [submission_id]
    assert call["queue"] == queue
    assert (call["soft_time_limit"], call["time_limit"]) == (soft, hard)


def test_submission_whose_spec_is_gone_is_still_sent(settings, db, accounts, sent) -> None:
    """Without limits: the worker then fails it with a reason rather than it staying queued."""
    submission_id = _queued_row(db, accounts["alice"], PHASE, "cpu")
    shutil.rmtree(settings.assignments_dir / SLUG)
    with db() as session:
        assert enqueue(session, settings, submission_id)
    [call] = sent
    assert "soft_time_limit" not in call and "time_limit" not in call


def test_time_limits_reach_the_broker_message(settings, db, accounts) -> None:
    submission_id = _queued_row(db, accounts["alice"], PHASE, "cpu")
    with db() as session:
        assert enqueue(session, settings, submission_id)
    with Connection(settings.broker_url) as connection:
        queue = connection.SimpleQueue("cpu")
        message = queue.get(timeout=5)
        assert message.payload[0] == [submission_id]
        assert message.headers["timelimit"] == [360, 300]  # (hard, soft), as the worker reads it
        message.ack()
        queue.close()
