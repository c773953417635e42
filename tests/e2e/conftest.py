"""Fixtures for end-to-end tests: throw-away Redis and PostgreSQL servers, a demo course built per
deployment (embedded SQLite or production Redis + PostgreSQL), and a running `autograder up`."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.servers import (
    EMBEDDED,
    PRODUCTION,
    Deployment,
    PostgresServer,
    RedisServer,
    RunningService,
    build_demo,
    clean_environment,
    free_port,
    postgres_server,
    redis_server,
    start_service,
)


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    """A tiny demo course, built once per configuration (parametrize it indirectly by name).

    ``production`` points the demo build and the service at the throw-away PostgreSQL and Redis
    and runs with ``AUTOGRADER_ENVIRONMENT=production`` (which demands a real secret key).
    """
    name = str(request.param)
    home = tmp_path_factory.mktemp(f"home-{name}")
    env = clean_environment(
        {
            "AUTOGRADER_HOME": str(home),
            "AUTOGRADER_ASSIGNMENTS_DIR": str(home / "assignments"),
            "AUTOGRADER_PORT": str(free_port()),
        }
    )
    pg: PostgresServer | None = None
    if name == PRODUCTION:
        pg = request.getfixturevalue("postgres")
        broker: RedisServer = request.getfixturevalue("redis")
        env.update(
            DATABASE_URL=pg.url,
            CELERY_BROKER_URL=broker.url,
            AUTOGRADER_ENVIRONMENT="production",
            AUTOGRADER_SECRET_KEY=secrets.token_urlsafe(48),
        )
    elif name != EMBEDDED:
        raise ValueError(f"unknown deployment {name!r}")
    build_demo(home, env)
    credentials = json.loads((home / "demo-credentials.json").read_text(encoding="utf-8"))
    return Deployment(name=name, home=home, env=env, credentials=credentials, postgres=pg)


@pytest.fixture
def service(deployment: Deployment, tmp_path: Path) -> Iterator[RunningService]:
    """`autograder up` on the deployment, healthy with a worker; killed if a test left it up."""
    running = start_service(deployment.env, base_url=deployment.base_url, directory=tmp_path)
    try:
        yield running
    finally:
        running.kill()
