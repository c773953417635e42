"""Enqueue after commit: a broker outage at submit time loses nothing."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from kombu import Connection

from server.main import create_app
from server.models import Submission, SubmissionStatus
from server.queue import enqueue_pending
from tests.conftest import PHASE, SLUG, Account, Artifacts


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
