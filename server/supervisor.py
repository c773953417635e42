"""`autograder up`: run migrations, then start and supervise the API and a Celery worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from server.assignments import SpecError, load_assignments
from server.config import Settings
from server.db import session_factory_for
from server.migrations import upgrade
from server.queue import sweep

log = logging.getLogger(__name__)
PENDING_SWEEP_S = 10.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        alias = info.validation_alias
        key = (
            str(alias.choices[0])
            if alias is not None and hasattr(alias, "choices")
            else f"AUTOGRADER_{name.upper()}"
        )
        env[key] = str(value.value if hasattr(value, "value") else value)
    return env


def api_command(settings: Settings) -> list[str]:
    """uvicorn with ``settings.api_processes`` processes (one: no process manager)."""
    processes = ["--workers", str(settings.api_processes)] if settings.api_processes > 1 else []
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "server.main:create_app",
        "--factory",
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--log-level",
        "warning",
        *processes,
    ]


def worker_command(settings: Settings, name: str = "cpu") -> list[str]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--queues",
        settings.worker_queues,
        "--concurrency",
        str(settings.worker_concurrency),
        "--pool",
        "prefork",
        "--hostname",
        f"{name}-{os.getpid()}@%h",
        "--loglevel",
        "INFO",
    ]
    if settings.is_embedded_broker:  # the SQLAlchemy transport has no broadcast
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return command


@dataclass
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start_at: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    """Starts children in their own sessions, restarts any that die, stops all on a signal."""

    def __init__(self, settings: Settings, children: list[Child]) -> None:
        self.settings = settings
        self.children = children
        self.env = {**os.environ, **settings_env(settings)}
        self.stopping = False

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(child.command, env=self.env, start_new_session=True)
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def stop(self, timeout: float = 15.0) -> None:
        for child in self.children:
            if child.process and child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for child in self.children:
            self._start(child)
        factory = session_factory_for(self.settings.db_url)
        next_sweep = time.monotonic() + PENDING_SWEEP_S
        try:
            while not self.stopping:
                time.sleep(0.2)
                now = time.monotonic()
                for child in self.children:
                    code = child.process.poll() if child.process else None
                    if child.process is not None and code is not None:
                        if now - child.started_at > 60:
                            child.restarts = 0
                        delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                        print(
                            f"autograder: {child.name} exited with code {code}; "
                            f"restarting in {delay:.0f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                        child.process = None
                        child.restarts += 1
                        child.next_start_at = now + delay
                    if child.process is None and now >= child.next_start_at:
                        self._start(child)
                if now >= next_sweep:
                    next_sweep = now + PENDING_SWEEP_S
                    try:
                        with factory() as session:
                            report = sweep(session, self.settings)
                        if report.requeued or report.failed or report.sent:
                            print(f"autograder: sweep {report}", flush=True)
                    except Exception:
                        log.warning("pending sweep failed", exc_info=True)
        finally:
            print("autograder: stopping...", file=sys.stderr, flush=True)
            self.stop()
        return 0


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def up(settings: Settings, *, worker: bool = True) -> int:
    """Migrate the database and run the API (and a worker) until Ctrl-C."""
    try:
        specs = load_assignments(
            settings.assignments_dir, visibility_timeout_s=settings.visibility_timeout_s
        )
    except SpecError as exc:
        print(
            f"autograder: invalid assignment spec, fix it and start again:\n{exc}", file=sys.stderr
        )
        return 1
    if not _port_is_free(settings.host, settings.port):
        print(
            f"autograder: {settings.host}:{settings.port} is already in use (another "
            "autograder?); stop it or choose another port with AUTOGRADER_PORT=...",
            file=sys.stderr,
        )
        return 1
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    print(f"autograder: {len(specs)} assignment(s) from {settings.assignments_dir}", flush=True)
    children = [Child("api", api_command(settings))]
    if worker:
        children.append(Child("worker", worker_command(settings)))
    print(
        f"autograder: API on {settings.public_url} (docs at {settings.public_url}/docs)", flush=True
    )
    return Supervisor(settings, children).run()
