"""A PostgreSQL restart while a submission is graded: the score is still recorded, by the same run.

Runs the scoring task as a plain function against a real, throw-away PostgreSQL 15 that the test
stops and starts again (skipped with a reason where PostgreSQL 15 is not installed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db import run_with_retry, session_factory_for
from server.migrations import upgrade
from server.models import Submission, SubmissionStatus
from tests.conftest import Account, Artifacts, make_account
from tests.e2e.servers import PostgresServer, postgres_server
from tests.worker.test_scoring import queued
from worker import scoring
from worker.scoring import Outcome, run_scoring

pytestmark = [pytest.mark.production, pytest.mark.slow]

DOWN_S = 2.0
"""How long the database stays down after grading, before it is started again."""


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_settings(settings: Settings, postgres: PostgresServer) -> Settings:
    with postgres.connect() as connection:  # a clean schema for each test
        connection.execute("DROP SCHEMA public CASCADE")
        connection.execute("CREATE SCHEMA public")
    upgrade(postgres.url)
    return settings.model_copy(update={"database_url": postgres.url})


@pytest.fixture
def pg(pg_settings: Settings) -> sessionmaker[Session]:
    return session_factory_for(pg_settings.db_url)


def test_score_is_recorded_when_the_database_restarts_during_grading(
    pg: sessionmaker[Session],
    pg_settings: Settings,
    postgres: PostgresServer,
    artifacts: Artifacts,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice: Account = make_account(pg, pg_settings, "alice")
    submission_id = queued(pg, pg_settings, alice, artifacts.eval_set.images)
    real_grade = scoring._grade
    restarted = threading.Event()

    def grade_across_restarts(session, settings_, sid, token, claim):  # type: ignore[no-untyped-def]
        postgres.stop()  # every pooled connection dies; the grader's progress write comes next
        postgres.start()
        graded = session.get(Submission, sid)  # held by the grader, as a defense grader does
        results = real_grade(session, settings_, sid, token, claim)
        postgres.stop()  # down when the score is written: the write must wait for it

        def start_later() -> None:
            time.sleep(DOWN_S)
            postgres.start()
            restarted.set()

        threading.Thread(target=start_later, daemon=True).start()
        scoring._set_progress(session, sid, token, {"stage": "almost done"})  # dropped, no raise
        assert graded.batch_path  # still loaded: the failed write rolled back nothing of ours
        return results

    monkeypatch.setattr(scoring, "_grade", grade_across_restarts)
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    outcome = run_scoring(submission_id, settings=pg_settings, session_factory=pg)
    elapsed = time.monotonic() - started

    assert restarted.wait(30)
    assert outcome is Outcome.SCORED
    assert elapsed >= DOWN_S  # the outcome waited for the database instead of failing
    with pg() as session:
        row = session.get(Submission, submission_id)
        assert row is not None
        assert row.status is SubmissionStatus.SCORED, (row.status, row.error_message)
        assert row.attempts == 1 and row.results is not None and row.score is not None
        assert row.progress is None and row.lease_expires_at is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("progress of" in m and "not saved" in m for m in messages), messages
    assert any("recording the outcome" in m and "retrying" in m for m in messages), messages


def test_write_gives_up_after_its_time_and_does_not_retry_other_errors(
    pg: sessionmaker[Session], postgres: PostgresServer
) -> None:
    calls = 0

    def duplicate_key(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.execute(text("CREATE TEMPORARY TABLE t (id int PRIMARY KEY)"))
        session.execute(text("INSERT INTO t VALUES (1), (1)"))

    with pg() as session:
        with pytest.raises(IntegrityError):
            run_with_retry(session, lambda: duplicate_key(session), what="test", within_s=5)
    assert calls == 1  # a real error is raised at once

    postgres.stop()
    try:
        with pg() as session:
            started = time.monotonic()
            with pytest.raises(OperationalError):
                run_with_retry(
                    session, lambda: session.execute(text("SELECT 1")), what="test", within_s=1.5
                )
            assert 1.0 <= time.monotonic() - started < 5.0
    finally:
        postgres.start()
