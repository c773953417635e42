"""Observability: the Prometheus `/metrics` text and the per-queue numbers of `/api/v1/health`,
both computed from the rows in the database."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db import utcnow
from server.models import FailureCause, Submission, SubmissionStatus, WorkerHeartbeat
from server.services.metrics import DURATION_BUCKETS_S
from tests.conftest import PHASE, SLUG, Account, Artifacts, perturbed
from worker import scoring
from worker.scoring import Outcome, run_scoring

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Exposition:
    """A parsed text exposition: metric family types and sample values by (name, labels)."""

    types: dict[str, str]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), v) for (n, labels), v in self.samples.items() if n == name]


def parse_exposition(text: str) -> Exposition:
    """Parse format 0.0.4 strictly: every sample follows the TYPE of its family, no series twice."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"TYPE of {name} given twice"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        family = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and types.get(name.removesuffix(suffix)) == "histogram":
                family = name.removesuffix(suffix)
        assert family in types, f"{name} has no TYPE line before it"
        labels: list[tuple[str, str]] = []
        rest = match["labels"] or ""
        while rest:
            label = LABEL.match(rest)
            assert label, f"bad labels in {line!r}"
            labels.append((label[1], label[2]))
            rest = rest[label.end() :]
        key = (name, frozenset(labels))
        assert key not in samples, f"series given twice: {line!r}"
        raw = match["value"]
        samples[key] = math.inf if raw == "+Inf" else float(raw)
    return Exposition(types, samples)


def le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


ROWS: list[tuple[str, SubmissionStatus, float | None, FailureCause | None]] = [
    # queue, status, seconds from claim to finish (None: never finished), failure cause
    ("cpu", SubmissionStatus.QUEUED, None, None),
    ("cpu", SubmissionStatus.QUEUED, None, None),
    ("cpu", SubmissionStatus.RUNNING, None, None),
    ("cpu", SubmissionStatus.SCORED, 0.5, None),
    ("cpu", SubmissionStatus.SCORED, 12.0, None),
    ("cpu", SubmissionStatus.SCORED, 400.0, None),
    ("cpu", SubmissionStatus.FAILED, 3.0, FailureCause.GRADER),
    ("cpu", SubmissionStatus.FAILED, 300.25, FailureCause.TIME_LIMIT),
    ("cpu", SubmissionStatus.CANCELLED, None, None),
    ("gpu", SubmissionStatus.QUEUED, None, None),
    ("gpu", SubmissionStatus.RUNNING, None, None),
    ("gpu", SubmissionStatus.SCORED, 5000.0, None),
    ("gpu", SubmissionStatus.FAILED, 200.0, FailureCause.INFRASTRUCTURE),
    ("gpu", SubmissionStatus.FAILED, 20.0, None),  # failed before causes were recorded
]


def add_rows(factory: sessionmaker[Session], account: Account) -> None:
    now = utcnow()
    with factory() as session:
        for i, (queue, status, seconds, cause) in enumerate(ROWS):
            started = now - timedelta(hours=2) if status is not SubmissionStatus.QUEUED else None
            row = Submission(
                user_id=account.user_id,
                assignment_slug=SLUG,
                phase_id=PHASE,
                status=status,
                queue=queue,
                file_name=f"{i}.npy",
                file_sha256="0" * 64,
                file_size=1,
                batch_path=f"/nowhere/{i}.npy",
                started_at=started if status is not SubmissionStatus.CANCELLED else None,
                failure_cause=cause,
            )
            if seconds is not None and started is not None:
                row.finished_at = started + timedelta(seconds=seconds)
            session.add(row)
        for hostname, queues, age_s in (
            ("both@a", "cpu,gpu", 1.0),
            ("gpu@b", "gpu", 5.0),
            ("dead@c", "cpu", 10 * 60.0),
        ):
            seen = now - timedelta(seconds=age_s)
            session.add(
                WorkerHeartbeat(
                    hostname=hostname, queues=queues, pid=1, started_at=seen, last_seen_at=seen
                )
            )
        session.commit()


@pytest.fixture
def rows(db: sessionmaker[Session], accounts: dict[str, Account]) -> None:
    add_rows(db, accounts["alice"])


def scrape(client: TestClient) -> Exposition:
    response = client.get("/metrics")  # no token
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(response.text)


def test_metrics_are_served_at_the_root_without_a_token(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200
    assert client.get("/api/v1/metrics").status_code == 404
    metrics = scrape(client)
    assert metrics.types == {
        "autograder_queue_depth": "gauge",
        "autograder_running": "gauge",
        "autograder_workers_alive": "gauge",
        "autograder_submissions_total": "gauge",
        "autograder_task_duration_seconds": "histogram",
        "autograder_failures_total": "counter",
    }
    assert metrics.value("autograder_queue_depth", queue="gpu") == 0  # every queue, even empty
    assert metrics.value("autograder_failures_total", cause="time_limit") == 0
    causes = {labels["cause"] for labels, _ in metrics.series("autograder_failures_total")}
    assert causes == {cause.value for cause in FailureCause}  # "unknown" only when there are


def test_gauges_and_counts_follow_the_rows(client: TestClient, rows: None) -> None:
    metrics = scrape(client)
    assert metrics.value("autograder_queue_depth", queue="cpu") == 2
    assert metrics.value("autograder_queue_depth", queue="gpu") == 1
    assert metrics.value("autograder_running", queue="cpu") == 1
    assert metrics.value("autograder_running", queue="gpu") == 1
    assert metrics.value("autograder_workers_alive") == 2  # the third heartbeat is stale
    for queue in ("cpu", "gpu"):
        for status in SubmissionStatus:
            expected = sum(1 for q, s, _, _ in ROWS if (q, s) == (queue, status))
            assert (
                metrics.value("autograder_submissions_total", status=status.value, queue=queue)
                == expected
            ), (queue, status)
    failures = {
        labels["cause"]: value for labels, value in metrics.series("autograder_failures_total")
    }
    assert failures == {
        "infrastructure": 1,
        "artifact": 0,
        "grader": 1,
        "internal": 0,
        "time_limit": 1,
        "unknown": 1,
    }


def test_duration_histogram_counts_every_finished_row(client: TestClient, rows: None) -> None:
    metrics = scrape(client)
    name = "autograder_task_duration_seconds"
    total = 0.0
    for queue in ("cpu", "gpu"):
        for outcome in (SubmissionStatus.SCORED, SubmissionStatus.FAILED):
            labels = {"queue": queue, "outcome": outcome.value}
            seconds = [d for q, s, d, _ in ROWS if (q, s) == (queue, outcome) and d is not None]
            buckets = [
                metrics.value(f"{name}_bucket", **labels, le=le(bound))
                for bound in (*DURATION_BUCKETS_S, math.inf)
            ]
            assert buckets == sorted(buckets), f"buckets of {labels} are not cumulative"
            assert buckets == [
                sum(d <= bound for d in seconds) for bound in (*DURATION_BUCKETS_S, math.inf)
            ]
            count = metrics.value(f"{name}_count", **labels)
            assert buckets[-1] == count == len(seconds)
            assert metrics.value(f"{name}_sum", **labels) == pytest.approx(sum(seconds))
            total += count
    finished = [r for r in ROWS if r[1] in (SubmissionStatus.SCORED, SubmissionStatus.FAILED)]
    assert total == len(finished) == 8
    # spot checks against the rows written above, not the formula
    assert metrics.value(f"{name}_bucket", queue="cpu", outcome="scored", le="15") == 2
    assert metrics.value(f"{name}_bucket", queue="cpu", outcome="failed", le="300") == 1
    assert metrics.value(f"{name}_sum", queue="cpu", outcome="scored") == pytest.approx(412.5)
    assert metrics.value(f"{name}_bucket", queue="gpu", outcome="scored", le="3600") == 0


def test_health_reports_each_queue_and_the_live_workers(client: TestClient, rows: None) -> None:
    body = client.get("/api/v1/health").json()
    assert body["queues"] == {
        "cpu": {"queued": 2, "running": 1, "workers": 1},
        "gpu": {"queued": 1, "running": 1, "workers": 2},
    }
    assert (body["queued"], body["running"]) == (3, 2)
    assert [(w["hostname"], w["queues"]) for w in body["workers"]] == [
        ("both@a", "cpu,gpu"),
        ("gpu@b", "gpu"),
    ]


def test_a_real_run_and_a_time_limited_run_show_up(
    client: TestClient,
    db: sessionmaker[Session],
    settings: Settings,
    accounts: dict[str, Account],
    artifacts: Artifacts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = []
    for seed in (1, 2):
        path = settings.upload_path / f"{seed}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, perturbed(artifacts.eval_set.images, seed=seed), allow_pickle=False)
        with db() as session:
            row = Submission(
                user_id=accounts["alice"].user_id,
                assignment_slug=SLUG,
                phase_id=PHASE,
                status=SubmissionStatus.QUEUED,
                file_name=path.name,
                file_sha256="0" * 64,
                file_size=path.stat().st_size,
                batch_path=str(path),
            )
            session.add(row)
            session.commit()
            ids.append(row.id)
    assert run_scoring(ids[0], settings=settings, session_factory=db) is Outcome.SCORED

    def interrupted(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(scoring, "_grade", interrupted)
    assert run_scoring(ids[1], settings=settings, session_factory=db) is Outcome.FAILED
    metrics = scrape(client)
    assert metrics.value("autograder_submissions_total", status="scored", queue="cpu") == 1
    assert metrics.value("autograder_failures_total", cause="time_limit") == 1
    count = "autograder_task_duration_seconds_count"
    assert metrics.value(count, queue="cpu", outcome="scored") == 1
    assert metrics.value(count, queue="cpu", outcome="failed") == 1
    assert metrics.value("autograder_queue_depth", queue="cpu") == 0
