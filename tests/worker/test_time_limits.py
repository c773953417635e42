"""Phase time limits enforced by a real Celery prefork worker on the embedded broker: the soft
limit interrupts the grader, the hard limit kills the process; both fail the submission with
cause ``time_limit``, uncharged, and leave nothing for the sweep to retry."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.models import FailureCause, Submission, SubmissionStatus
from server.queue import enqueue, sweep
from server.supervisor import settings_env, worker_command
from tests.conftest import PHASE, Account, Artifacts, spec_toml, write_spec

pytestmark = pytest.mark.slow

SLOW_FACTORIES = {
    "soft": """
import time

from graders.architectures import build_model


def make_net():
    time.sleep(120)  # interrupted by SoftTimeLimitExceeded
    return build_model("resnet20")
""",
    "hard": """
import time


def make_net():
    while True:
        try:
            time.sleep(120)
        except BaseException:
            pass  # a grader that swallows the soft limit: only the hard limit stops it
""",
}
"""Trusted TA factory files (one assignment each) whose hidden model takes for ever to build."""

WAIT_S = 120.0


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    """`autograder worker`'s Celery command (prefork, concurrency 1) on the test settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGRADER_")}
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    env.update(settings_env(settings.model_copy(update={"worker_queues": "cpu"})))
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            worker_command(settings),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _submit(
    factory: sessionmaker[Session], settings: Settings, account: Account, slug: str, batch: Path
) -> str:
    with factory() as session:
        row = Submission(
            user_id=account.user_id,
            assignment_slug=slug,
            phase_id=PHASE,
            status=SubmissionStatus.QUEUED,
            file_name=batch.name,
            file_sha256="0" * 64,
            file_size=batch.stat().st_size,
            batch_path=str(batch),
        )
        session.add(row)
        session.commit()
        assert enqueue(session, settings, row.id)
        return row.id


def test_soft_and_hard_time_limits_fail_the_submission(
    settings: Settings,
    db: sessionmaker[Session],
    accounts: dict[str, Account],
    artifacts: Artifacts,
    worker: Path,
) -> None:
    for slug, code in SLOW_FACTORIES.items():
        text = spec_toml(artifacts).replace(
            'architecture = "resnet20"', 'factory = "slow.py:make_net"', 1
        )
        limits = "soft_time_limit_s = 1, time_limit_s = 4"
        text = text.replace("max_upload_mb = 1 }", f"max_upload_mb = 1, {limits} }}")
        folder = write_spec(settings.assignments_dir, text, slug=slug).parent
        (folder / "slow.py").write_text(code)
    batch = settings.upload_path / "batch.npy"
    batch.parent.mkdir(parents=True, exist_ok=True)
    np.save(batch, artifacts.eval_set.images, allow_pickle=False)
    ids = {slug: _submit(db, settings, accounts["alice"], slug, batch) for slug in SLOW_FACTORIES}

    deadline = time.monotonic() + WAIT_S
    while True:
        with db() as session:
            rows = {slug: session.get(Submission, i) for slug, i in ids.items()}
            if all(row.status.is_final for row in rows.values()):
                break
        assert time.monotonic() < deadline, (
            f"not final after {WAIT_S:.0f} s: {[r.status for r in rows.values()]}\n"
            + worker.read_text(errors="replace")[-3000:]
        )
        time.sleep(0.5)

    soft, hard = rows["soft"], rows["hard"]
    for row in (soft, hard):
        assert row.status is SubmissionStatus.FAILED, row.error_log
        assert row.failure_cause is FailureCause.TIME_LIMIT, row.error_log
        assert row.error_message.startswith("Time limit exceeded")
        assert row.attempts == 1 and row.lease_expires_at is None
    assert "limit of 1 s" in soft.error_message and "SoftTimeLimitExceeded" in soft.error_log
    assert "limit of 4 s" in hard.error_message
    assert "killed at the hard time limit (4 s)" in hard.error_log
    with db() as session:
        report = sweep(session, settings)
    assert (report.requeued, report.failed) == (0, 0)
