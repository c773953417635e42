"""Alembic migrations create exactly the schema the ORM models describe."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from server.db import Base
from server.migrations import upgrade


def test_upgrade_creates_schema_matching_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    upgrade(url)  # idempotent
    engine = create_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    assert {"user", "api_token", "submission", "worker_heartbeat"} <= set(
        inspect(engine).get_table_names()
    )


def test_failures_recorded_before_0003_get_their_cause(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0002")
    messages = {
        "a": ("failed", "Infrastructure error: the worker scoring this submission stopped 3 times"),
        "b": ("failed", "The grader could not load a hidden artifact of this phase. ..."),
        "c": ("failed", "The grader could not score this submission: bad checkpoint"),
        "d": ("failed", "Internal grader error (KeyError). This is not a problem ..."),
        "e": ("failed", "Something else entirely"),
        "f": ("scored", None),
    }
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO user (id, username, role, pseudonym, created_at) "
                "VALUES (1, 'u', 'student', 'p', '2026-01-01 00:00:00')"
            )
        )
        for row_id, (status, message) in messages.items():
            connection.execute(
                text(
                    "INSERT INTO submission (id, user_id, assignment_slug, phase_id, status, "
                    "file_name, file_sha256, file_size, batch_path, attempts, error_message, "
                    "created_at) VALUES (:id, 1, 'c', 'p', :status, 'f', 'x', 1, '/b', 1, "
                    ":message, '2026-01-01 00:00:00')"
                ),
                {"id": row_id, "status": status, "message": message},
            )
    upgrade(url)
    with engine.connect() as connection:
        causes = dict(connection.execute(text("SELECT id, failure_cause FROM submission")).all())
    assert causes == {
        "a": "infrastructure",
        "b": "artifact",
        "c": "grader",
        "d": "internal",
        "e": None,
        "f": None,
    }
