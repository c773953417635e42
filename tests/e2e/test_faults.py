"""Faults on the production setup, on the real processes: a worker killed with SIGKILL in the
middle of an evaluation, Redis restarted (and wiped) with submissions waiting, PostgreSQL restarted
while a worker evaluates, Redis down when a student submits, and one message delivered twice.
Each ends with every submission scored exactly once.

One `autograder up` (uvicorn, a Celery worker, the sweeper every 10 s) on a throw-away PostgreSQL
15 and a Redis with its append-only file (as in docker-compose.yml) serves the whole module, with
a short lease (15 s) and a short re-send delay (8 s) so that recovery takes seconds, not minutes.
The tests run in file order and each leaves the service healthy for the next one.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import redis as redis_client

from server.config import Settings
from tests.e2e.servers import (
    PRODUCTION,
    Deployment,
    PostgresServer,
    RedisServer,
    RunningService,
    build_demo,
    clean_environment,
    free_port,
    log_tail,
    postgres_server,
    redis_server,
    start_service,
)
from worker.celery_app import CPU_QUEUE, SCORE_TASK, celery_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.production]

T = TypeVar("T")

LEASE_S = 15
REQUEUE_QUEUED_AFTER_S = 8
SWEEP_EVERY_S = 10  # server.supervisor.PENDING_SWEEP_S
POSTGRES_DOWN_S = 5.0
"""Long enough for the demo's small evaluation to reach its end (transfer scores, the result)
while the database is down; well within the lease less two renewal intervals, so the evaluating
run keeps its lease and no sweep takes the submission from it."""
RECOVERY_TIMEOUT_S = 180.0
"""Generous: the machine running the tests may be busy; a healthy run needs a fraction of it."""

ASSIGNMENT, ATTACK, DEFENSE = "demo", "attack", "defense"
EPS = 8


# ---------------------------------------------------------------------------------------------
# Fixtures: one production deployment and one running service for the module


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("faults-redis"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def deployment(
    pg: PostgresServer, broker: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    home = tmp_path_factory.mktemp("faults-home")
    env = clean_environment(
        {
            "AUTOGRADER_HOME": str(home),
            "AUTOGRADER_ASSIGNMENTS_DIR": str(home / "assignments"),
            "AUTOGRADER_PORT": str(free_port()),
            "DATABASE_URL": pg.url,
            "CELERY_BROKER_URL": broker.url,
            "AUTOGRADER_ENVIRONMENT": "production",
            "AUTOGRADER_SECRET_KEY": secrets.token_urlsafe(48),
        }
    )
    build_demo(home, env)
    # When a point of the demo's baseline defense survives the white-box attacks, Square's 1000
    # queries dominate a CPU evaluation; 100 keep every evaluation here to seconds.
    spec = home / "assignments" / ASSIGNMENT / "assignment.toml"
    text = spec.read_text(encoding="utf-8")
    assert "square_queries = 1000" in text, text
    spec.write_text(text.replace("square_queries = 1000", "square_queries = 100"), "utf-8")
    credentials = json.loads((home / "demo-credentials.json").read_text(encoding="utf-8"))
    return Deployment(name=PRODUCTION, home=home, env=env, credentials=credentials, postgres=pg)


@pytest.fixture(scope="module")
def service(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    env = {
        **deployment.env,
        "AUTOGRADER_LEASE_S": str(LEASE_S),
        "AUTOGRADER_REQUEUE_QUEUED_AFTER_S": str(REQUEUE_QUEUED_AFTER_S),
    }
    running = start_service(
        env, base_url=deployment.base_url, directory=tmp_path_factory.mktemp("faults-service")
    )
    try:
        yield running
        running.stop()  # Ctrl-C still stops everything after all these faults
    finally:
        running.kill()


@pytest.fixture(scope="module")
def clean_images(deployment: Deployment, service: RunningService) -> np.ndarray:
    response = get(
        deployment,
        "alice",
        f"/api/v1/assignments/{ASSIGNMENT}/phases/{ATTACK}/dataset",
        format="npz",
    )
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
        return np.asarray(npz["images"])


@pytest.fixture
def healthy(service: RunningService) -> Iterator[RunningService]:
    """The shared service, healthy with a live worker before and after the test."""
    wait_healthy(service)
    yield service
    wait_healthy(service)


# ---------------------------------------------------------------------------------------------
# Talking to the service and looking at what it stored


def get(deployment: Deployment, user: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{deployment.base_url}{path}", headers=deployment.headers(user), params=params, timeout=30
    )


def wait_until(
    check: Callable[[], T | None], *, what: str, service: RunningService, timeout: float
) -> T:
    """Poll ``check`` until it returns something other than None (or False); fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{log_tail(service.log, 60)}")
        time.sleep(0.1)


def wait_healthy(service: RunningService) -> None:
    def ok() -> bool:
        try:
            health = service.health()
        except (httpx.HTTPError, ValueError):
            return False
        return health.get("status") == "ok" and bool(health.get("workers"))

    wait_until(ok, what="health ok with a live worker", service=service, timeout=120)


def submit_attack(
    deployment: Deployment, user: str, clean: np.ndarray, seed: int
) -> dict[str, Any]:
    noise = np.random.default_rng(seed).choice([-EPS, EPS], size=clean.shape)
    batch = np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, batch, allow_pickle=False)
    response = httpx.post(
        f"{deployment.base_url}/api/v1/assignments/{ASSIGNMENT}/phases/{ATTACK}/submissions",
        headers=deployment.headers(user),
        files={"file": ("adv.npy", buffer.getvalue(), "application/octet-stream")},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def submit_defense(deployment: Deployment, user: str) -> str:
    baseline = deployment.credentials["baseline_defense"]
    response = httpx.post(
        f"{deployment.base_url}/api/v1/assignments/{ASSIGNMENT}/phases/{DEFENSE}/submissions",
        headers=deployment.headers(user),
        files={
            "file": ("baseline.safetensors", Path(baseline["checkpoint"]).read_bytes()),
            "manifest": ("manifest.json", Path(baseline["manifest"]).read_bytes()),
        },
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def submission(deployment: Deployment, user: str, submission_id: str) -> dict[str, Any]:
    response = get(deployment, user, f"/api/v1/submissions/{submission_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_scored(
    deployment: Deployment, service: RunningService, user: str, submission_id: str
) -> dict[str, Any]:
    def scored() -> dict[str, Any] | None:
        body = submission(deployment, user, submission_id)
        assert body["status"] in {"queued", "running", "scored"}, body
        return body if body["status"] == "scored" else None

    return wait_until(
        scored,
        what=f"submission {submission_id} scored",
        service=service,
        timeout=RECOVERY_TIMEOUT_S,
    )


def freeze_mid_evaluation(
    deployment: Deployment, service: RunningService, user: str, submission_id: str
) -> tuple[int, dict[str, Any]]:
    """Wait until the worker evaluates the defense (its progress is past loading), then stop the
    scoring process with SIGSTOP so the fault lands in the middle of the evaluation however fast
    the demo's defense is to evaluate. Returns the stopped pid and the submission as it was."""

    def evaluating() -> dict[str, Any] | None:
        body = submission(deployment, user, submission_id)
        assert body["status"] in {"queued", "running"}, f"finished before the fault: {body}"
        stage = (body["progress"] or {}).get("stage")
        return body if stage not in {None, "loading"} else None

    wait_until(evaluating, what=f"defense {submission_id} evaluated", service=service, timeout=120)
    _, pool = worker_processes(service)
    assert len(pool) == 1, pool
    os.kill(pool[0], signal.SIGSTOP)
    try:
        body = submission(deployment, user, submission_id)
        assert body["status"] == "running" and body["progress"], f"not mid-evaluation: {body}"
    except BaseException:
        os.kill(pool[0], signal.SIGCONT)
        raise
    return pool[0], body


def row(deployment: Deployment, submission_id: str) -> dict[str, Any]:
    """The submission's row, straight from PostgreSQL."""
    assert deployment.postgres is not None
    with deployment.postgres.connect() as connection:
        cursor = connection.execute(
            "SELECT status, attempts, task_id, finished_at, score, results FROM submission "
            "WHERE id = %s",
            (submission_id,),
        )
        found = cursor.fetchall()
    assert len(found) == 1, found
    status, attempts, task_id, finished_at, score, results = found[0]
    return {
        "status": status,
        "attempts": attempts,
        "task_id": task_id,
        "finished_at": finished_at,
        "score": score,
        "results": json.loads(results) if isinstance(results, str) else results,
    }


def transfer_cells(deployment: Deployment, defense_id: str) -> dict[str, int]:
    """attack submission id -> how many transfer rows the defense has for it."""
    assert deployment.postgres is not None
    with deployment.postgres.connect() as connection:
        rows = connection.execute(
            "SELECT attack_submission_id, count(*) FROM transfer_result "
            "WHERE defense_submission_id = %s GROUP BY attack_submission_id",
            (defense_id,),
        ).fetchall()
    return {str(attack): int(count) for attack, count in rows}


def leaderboard_entry(deployment: Deployment, user: str, phase: str) -> dict[str, Any]:
    response = get(deployment, user, f"/api/v1/assignments/{ASSIGNMENT}/phases/{phase}/leaderboard")
    assert response.status_code == 200, response.text
    mine = [e for e in response.json()["entries"] if e["is_you"]]
    assert len(mine) == 1, response.json()
    return dict(mine[0])


def assert_scored_once(deployment: Deployment, user: str, submission_id: str, phase: str) -> None:
    """One stored result, shown once: the user's leaderboard entry counts it once."""
    entry = leaderboard_entry(deployment, user, phase)
    assert entry["submissions"] == 1 and entry["submission_id"] == submission_id, entry


def broker_settings(deployment: Deployment) -> Settings:
    return Settings(
        celery_broker_url=deployment.env["CELERY_BROKER_URL"],
        database_url=deployment.env["DATABASE_URL"],
    )


def queued_task_ids(broker: RedisServer, queue: str = CPU_QUEUE) -> list[str]:
    """The task ids of the messages waiting in a Redis queue (kombu keeps each queue as a list)."""
    client = redis_client.Redis(host="127.0.0.1", port=broker.port)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    return [json.loads(item)["headers"]["id"] for item in raw]


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def worker_processes(service: RunningService) -> tuple[int, list[int]]:
    """The Celery worker's main process and its pool processes."""
    celery = {pid for pid, cmd in service.processes().items() if "celery" in cmd}
    main = [pid for pid in celery if _ppid(pid) not in celery]
    assert len(main) == 1, service.processes()
    return main[0], [pid for pid in celery if _ppid(pid) == main[0]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_hostname(service: RunningService) -> str:
    workers = service.health()["workers"]
    assert len(workers) == 1, workers
    return str(workers[0]["hostname"])


def report(**seconds: float) -> None:
    """Print the measured times (shown with ``pytest -rP``)."""
    print("measured: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


# ---------------------------------------------------------------------------------------------
# The faults


@pytest.mark.timeout(300)
def test_broker_down_at_submit_time_then_scored_when_it_returns(
    deployment: Deployment,
    healthy: RunningService,
    broker: RedisServer,
    clean_images: np.ndarray,
) -> None:
    broker.stop()
    try:
        started = time.monotonic()
        accepted = submit_attack(deployment, "alice", clean_images, seed=1)
        submit_s = time.monotonic() - started
        assert accepted["status"] == "queued", accepted
        stored = row(deployment, accepted["id"])
        assert stored["status"] == "queued" and stored["task_id"] is None, stored
        health = healthy.health()
        assert health["broker"]["ok"] is False and health["status"] != "ok", health
    finally:
        broker.start()
    back = time.monotonic()
    scored = wait_scored(deployment, healthy, "alice", accepted["id"])
    report(submit_while_broker_down_s=submit_s, broker_back_to_scored_s=time.monotonic() - back)
    assert scored["attempts"] == 1, scored
    assert row(deployment, accepted["id"])["task_id"] is not None
    assert_scored_once(deployment, "alice", accepted["id"], ATTACK)


@pytest.mark.timeout(300)
def test_a_second_delivery_of_the_same_message_changes_nothing(
    deployment: Deployment, healthy: RunningService, clean_images: np.ndarray
) -> None:
    accepted = submit_attack(deployment, "bob", clean_images, seed=2)
    first = wait_scored(deployment, healthy, "bob", accepted["id"])
    before = row(deployment, accepted["id"])

    started = time.monotonic()
    again = celery_for(broker_settings(deployment)).send_task(
        SCORE_TASK, args=[accepted["id"]], queue=CPU_QUEUE
    )
    done = re.compile(rf"\[{again.id}\] succeeded in [0-9.e-]+s: '(\w+)'")
    outcome = wait_until(
        lambda: (m := done.search(healthy.log.read_text(errors="replace"))) and m.group(1),
        what=f"the worker ran the second delivery (task {again.id})",
        service=healthy,
        timeout=60,
    )
    report(second_delivery_handled_s=time.monotonic() - started)
    assert outcome == "skipped"
    assert row(deployment, accepted["id"]) == before  # same finished_at, attempts, results
    after = submission(deployment, "bob", accepted["id"])
    for key in ("status", "attempts", "started_at", "finished_at", "score", "results"):
        assert after[key] == first[key], key
    assert after["attempts"] == 1
    assert_scored_once(deployment, "bob", accepted["id"], ATTACK)


@pytest.mark.timeout(300)
def test_queued_messages_survive_a_redis_restart_and_lost_ones_are_sent_again(
    deployment: Deployment,
    healthy: RunningService,
    broker: RedisServer,
    clean_images: np.ndarray,
) -> None:
    app = celery_for(broker_settings(deployment))
    hostname = worker_hostname(healthy)

    def remote_control(command: str) -> None:
        """Ask the worker to stop or start consuming the cpu queue (Celery remote control)."""
        with app.connection_for_write() as connection:  # a fresh one: Redis restarts below
            replies = app.control.broadcast(
                command,
                arguments={"queue": CPU_QUEUE},
                destination=[hostname],
                reply=True,
                timeout=10,
                connection=connection,
            )
        assert replies and "ok" in replies[0][hostname], replies

    # The worker stops taking attack batches, so their messages wait in Redis.
    remote_control("cancel_consumer")
    try:
        ids = [submit_attack(deployment, "carol", clean_images, seed=s)["id"] for s in (3, 4)]
        waiting = {row(deployment, sid)["task_id"] for sid in ids}
        assert waiting <= set(queued_task_ids(broker))

        # A restart: Redis reloads its append-only file and the messages are still there.
        started = time.monotonic()
        broker.stop()
        broker.start()
        restart_s = time.monotonic() - started
        assert waiting <= set(queued_task_ids(broker))

        # A restart that loses every message (no persistence): the sweeper sends them again.
        broker.stop()
        for aof in (broker.directory / "appendonlydir", broker.directory / "appendonly.aof"):
            if aof.is_dir():  # Redis 7 keeps its append-only files in a folder, Redis 6 in one
                shutil.rmtree(aof)
            else:
                aof.unlink(missing_ok=True)
        broker.start()
        assert queued_task_ids(broker) == []
        lost = {sid: row(deployment, sid)["task_id"] for sid in ids}
        lost_at = time.monotonic()

        def sent_again() -> bool:
            in_redis = set(queued_task_ids(broker))
            now = {sid: row(deployment, sid)["task_id"] for sid in ids}
            return all(now[sid] != lost[sid] and now[sid] in in_redis for sid in ids)

        wait_until(
            sent_again,
            what="the sweeper sent the lost messages again",
            service=healthy,
            timeout=REQUEUE_QUEUED_AFTER_S + 2 * SWEEP_EVERY_S + 30,
        )
        resend_s = time.monotonic() - lost_at
    finally:
        remote_control("add_consumer")
    started = time.monotonic()
    for sid in ids:
        scored = wait_scored(deployment, healthy, "carol", sid)
        assert scored["attempts"] == 1, scored  # the duplicates were skipped
    report(
        redis_restart_s=restart_s,
        lost_to_sent_again_s=resend_s,
        to_scored_s=time.monotonic() - started,
    )
    entry = leaderboard_entry(deployment, "carol", ATTACK)
    assert entry["submissions"] == 2, entry


@pytest.mark.timeout(300)
def test_postgres_restart_during_an_evaluation_loses_nothing(
    deployment: Deployment, healthy: RunningService, pg: PostgresServer
) -> None:
    defense_id = submit_defense(deployment, "alice")
    frozen, before = freeze_mid_evaluation(deployment, healthy, "alice", defense_id)
    started = time.monotonic()
    try:
        pg.stop()
    finally:
        os.kill(frozen, signal.SIGCONT)
    time.sleep(POSTGRES_DOWN_S)  # the evaluation goes on while the database is down
    pg.start()
    restart_s = time.monotonic() - started
    back = time.monotonic()
    scored = wait_scored(deployment, healthy, "alice", defense_id)
    report(postgres_restart_s=restart_s, back_to_scored_s=time.monotonic() - back)

    # The worker felt the outage mid-evaluation, and the run that was evaluating recorded its
    # own result: no second attempt was needed.
    log = healthy.log.read_text(errors="replace")
    assert f"lease renewal of {defense_id} failed" in log
    felt = {
        "progress writes dropped": log.count(f"progress of {defense_id} not saved"),
        "transfer retries": log.count(f"transfer scoring of defense {defense_id}: database"),
        "outcome retries": log.count(f"recording the outcome of {defense_id}: database"),
    }
    print(f"the evaluating worker during the outage: {felt}")
    assert scored["attempts"] == 1, scored
    assert scored["started_at"] == before["started_at"]
    cells = transfer_cells(deployment, defense_id)
    assert sorted(cells) == sorted(t["attack_submission_id"] for t in scored["results"]["transfer"])
    assert cells and set(cells.values()) == {1}, cells
    assert_scored_once(deployment, "alice", defense_id, DEFENSE)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("target", "user"), [("pool process", "bob"), ("main process", "carol")])
def test_worker_killed_in_the_middle_of_an_evaluation_scores_it_exactly_once(
    deployment: Deployment, healthy: RunningService, target: str, user: str
) -> None:
    defense_id = submit_defense(deployment, user)
    main, _ = worker_processes(healthy)
    frozen, before = freeze_mid_evaluation(deployment, healthy, user, defense_id)
    started = time.monotonic()
    os.kill(frozen if target == "pool process" else main, signal.SIGKILL)
    assert before["attempts"] == 1, before
    # The scoring process is gone either way (Celery's pool processes die with their parent).
    wait_until(lambda: not alive(frozen), what="the pool process died", service=healthy, timeout=10)

    scored = wait_scored(deployment, healthy, user, defense_id)
    report(kill_to_scored_s=time.monotonic() - started)
    assert scored["attempts"] == 2, scored  # the killed run, then one that finished
    cells = transfer_cells(deployment, defense_id)
    assert sorted(cells) == sorted(t["attack_submission_id"] for t in scored["results"]["transfer"])
    assert cells and set(cells.values()) == {1}, cells
    assert_scored_once(deployment, user, defense_id, DEFENSE)
    if target == "main process":  # `autograder up` started a new worker
        assert "worker exited with code -9" in healthy.log.read_text(errors="replace")
        assert worker_processes(healthy)[0] != main
