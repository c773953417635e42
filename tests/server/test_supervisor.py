"""`autograder up` start-up checks and the environment it hands to its children."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from server.config import Environment, Settings
from server.supervisor import api_command, settings_env, up, worker_command


def test_children_get_the_same_settings(tmp_path: Path, monkeypatch) -> None:
    settings = Settings(
        home=tmp_path,
        port=8123,
        environment=Environment.PRODUCTION,
        secret_key="s" * 40,
        database_url="postgresql+psycopg://u:p@db/x",
        celery_broker_url="redis://r:6379/0",
    )
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    rebuilt = Settings()
    assert rebuilt.model_dump() == settings.model_dump()
    assert "--without-gossip" not in worker_command(rebuilt)  # redis supports broadcast


def test_up_refuses_a_port_in_use(settings: Settings, capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert up(settings.model_copy(update={"port": port})) == 1
    assert "already in use" in capsys.readouterr().err
    assert not Path(settings.db_url.removeprefix("sqlite:///")).exists()  # nothing started


def test_up_refuses_an_invalid_spec(settings: Settings, capsys) -> None:
    spec = settings.assignments_dir / "course" / "assignment.toml"
    spec.write_text(spec.read_text().replace('track = "attack"', 'track = "exam"'))
    assert up(settings) == 1
    err = capsys.readouterr().err
    assert "invalid assignment spec" in err and "phases.0.track" in err


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_worker_command_names_the_node(settings: Settings, name: str) -> None:
    command = worker_command(settings, name)
    assert command[command.index("--hostname") + 1].startswith(f"{name}-")
    assert "--without-gossip" in command  # embedded SQLite transport has no broadcast


@pytest.mark.parametrize(("processes", "workers"), [(1, None), (2, "2"), (4, "4")])
def test_api_command_starts_the_configured_processes(
    settings: Settings, processes: int, workers: str | None
) -> None:
    command = api_command(settings.model_copy(update={"api_processes": processes}))
    assert command[command.index("--port") + 1] == str(settings.port)
    shown = command[command.index("--workers") + 1] if "--workers" in command else None
    assert shown == workers
