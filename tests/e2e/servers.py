"""Real processes for end-to-end tests: throw-away redis-server and PostgreSQL 15 instances, the
`autograder` command (demo build, `up`, `submit`), and checks that stopping leaves nothing behind.

Nothing here is mocked: every helper starts an operating-system process in a temporary directory
and stops it (and, for `autograder up`, every process it started) before returning or on teardown.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES_APT_PACKAGE = "postgresql-15"
REDIS_APT_PACKAGE = "redis-server"
POSTGRES_USER = "postgres"
DATABASE_NAME = "autograder"

SERVER_START_TIMEOUT_S = 30.0
SERVICE_START_TIMEOUT_S = 90.0
SERVICE_STOP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40

DEMO_OPTIONS = (
    "--defense-iterations",
    "10",
    "--train-per-class",
    "10",
    "--epochs",
    "1",
    "--eval-images",
    "20",
    "--seconds-per-model",
    "2",
)
"""The smallest demo that still trains three real models: about 15 s on two CPU cores."""

MARKER_VARIABLE = "E2E_AUTOGRADER_MARKER"
"""Set on `autograder up`; inherited by every process it starts, so leftovers can be found."""

_SERVICE_VARIABLES = ("DATABASE_URL", "CELERY_BROKER_URL")


# ---------------------------------------------------------------------------------------------
# Small utilities


def in_ci() -> bool:
    """True on the CI runner, where a missing server binary is a failure rather than a skip."""
    return os.environ.get("CI") == "true"


def require(found: str | Path | None, *, what: str, apt_package: str) -> str:
    """The path of a required binary, or skip the test (fail it in CI) naming what to install."""
    if found is not None and Path(found).is_file():
        return str(found)
    reason = (
        f"{what} is not installed; install the apt package {apt_package} "
        f"(apt-get install -y {apt_package}) to run this test"
    )
    if in_ci():
        pytest.fail(f"{reason} (missing binaries fail the build when CI=true)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, for failure messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {path} ---\n{tail}\n--- end of log ---"


def wait_for(
    ready: Callable[[], bool],
    *,
    timeout: float,
    process: subprocess.Popen[Any],
    what: str,
    log: Path,
    interval: float = 0.2,
) -> None:
    """Poll ``ready`` until it is true; fail with the log tail on timeout or if ``process`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        code = process.poll()
        if code is not None:
            pytest.fail(f"{what} exited with code {code} before it was ready\n{log_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} was not ready after {timeout:.0f} s\n{log_tail(log)}")
        time.sleep(interval)


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any autograder setting, plus ``extra``.

    A developer's own ``AUTOGRADER_*`` or ``DATABASE_URL`` must never leak into a test service.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AUTOGRADER_") and key not in _SERVICE_VARIABLES
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _stop_process(process: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """Send ``sig``, wait up to ``timeout`` s, then SIGKILL. Safe to call on an exited process."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------
# redis-server


@dataclass
class RedisServer:
    """A redis-server process that a test may stop and start again on the same port and folder."""

    port: int
    directory: Path
    log: Path
    appendonly: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (again) and wait until it answers; with ``appendonly`` it reloads
        what it had from its append-only file."""
        binary = require(
            shutil.which("redis-server"), what="redis-server", apt_package=REDIS_APT_PACKAGE
        )
        command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )
        wait_for(
            lambda: _redis_answers(self.port),
            timeout=SERVER_START_TIMEOUT_S,
            process=self.process,
            what=f"redis-server on port {self.port}",
            log=self.log,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM: a clean shutdown, as a restart does)."""
        if self.process is not None:
            _stop_process(self.process, signal.SIGTERM, timeout=10)


def _redis_answers(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextmanager
def redis_server(directory: Path, *, appendonly: bool = False) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, stopped on exit; without persistence unless
    ``appendonly`` (production's setting: an append-only file, kept over a restart)."""
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(
        port=free_port(), directory=directory, log=directory / "redis.log", appendonly=appendonly
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# PostgreSQL 15


@dataclass
class PostgresServer:
    """A PostgreSQL 15 cluster that a test may stop and start again on the same port and data."""

    port: int
    directory: Path
    log: Path
    database: str = DATABASE_NAME
    command: list[str] = field(default_factory=list, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL the service reads from ``DATABASE_URL``."""
        return f"postgresql+psycopg://{POSTGRES_USER}@127.0.0.1:{self.port}/{self.database}"

    def connect(self, database: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=POSTGRES_USER,
            dbname=database or self.database,
            connect_timeout=2,
            autocommit=True,
        )

    def start(self) -> None:
        """Start the server (again) on its data directory and port; wait until it answers."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                _as_postgres_user(self.command),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )
        wait_for(
            lambda: _postgres_answers(self.port),
            timeout=SERVER_START_TIMEOUT_S,
            process=self.process,
            what=f"PostgreSQL on port {self.port}",
            log=self.log,
        )

    def stop(self) -> None:
        """A "fast" shutdown: open connections are cut and their transactions rolled back."""
        if self.process is None:
            return
        pid = _postmaster_pid(self.directory / "data")
        if pid is not None and self.process.poll() is None:
            # Signal the postmaster itself (under runuser the Popen pid is runuser's).
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
        _stop_process(self.process, signal.SIGINT, timeout=10)


def _as_postgres_user(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the ``postgres`` user instead."""
    if os.geteuid() != 0:
        return command
    runuser = require(
        shutil.which("runuser"),
        what="runuser (needed to drop root for postgres)",
        apt_package="util-linux",
    )
    return [runuser, "-u", POSTGRES_USER, "--", *command]


def _postgres_answers(port: int) -> bool:
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user=POSTGRES_USER, dbname="postgres", connect_timeout=1
        ):
            return True
    except psycopg.OperationalError:
        return False


def _postmaster_pid(data: Path) -> int | None:
    """The postmaster's own pid (under runuser the Popen pid is runuser's)."""
    with suppress(OSError, ValueError, IndexError):
        return int((data / "postmaster.pid").read_text().splitlines()[0])
    return None


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 cluster in a fresh temporary directory with an empty ``autograder`` database.

    The directory is made with ``tempfile`` in the system temporary folder rather than under
    pytest's (mode 0700, owned by root), because the server may run as the ``postgres`` user.
    """
    initdb = require(
        POSTGRES_BIN / "initdb",
        what=f"PostgreSQL 15 ({POSTGRES_BIN}/initdb)",
        apt_package=POSTGRES_APT_PACKAGE,
    )
    postgres = require(
        POSTGRES_BIN / "postgres",
        what=f"PostgreSQL 15 ({POSTGRES_BIN}/postgres)",
        apt_package=POSTGRES_APT_PACKAGE,
    )
    directory = Path(tempfile.mkdtemp(prefix="autograder-e2e-pg-"))
    server: PostgresServer | None = None
    data = directory / "data"
    try:
        if os.geteuid() == 0:
            owner = pwd.getpwnam(POSTGRES_USER)
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        init = subprocess.run(
            _as_postgres_user(
                [
                    initdb,
                    "-D",
                    str(data),
                    "-U",
                    POSTGRES_USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=directory,
        )
        if init.returncode != 0:
            pytest.fail(f"initdb failed with code {init.returncode}:\n{init.stdout}\n{init.stderr}")
        port = free_port()
        log = directory / "postgres.log"
        command = [
            postgres,
            "-D",
            str(data),
            "-k",
            str(directory),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        server = PostgresServer(port=port, directory=directory, log=log, command=command)
        server.start()
        with server.connect("postgres") as connection:
            connection.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The `autograder` command

EMBEDDED = "embedded"
PRODUCTION = "production"
"""The two deployments the e2e tests run: SQLite + Celery on SQLite, or PostgreSQL + Redis."""


@dataclass(frozen=True)
class Deployment:
    """A demo course in its own home folder and the environment that runs the service on it."""

    name: str
    home: Path
    env: dict[str, str]
    credentials: dict[str, Any]
    postgres: PostgresServer | None = None

    @property
    def base_url(self) -> str:
        return str(self.credentials["base_url"])

    def token(self, username: str) -> str:
        accounts = [self.credentials["ta"], *self.credentials["students"]]
        return next(str(a["token"]) for a in accounts if a["username"] == username)

    def client_env(self, username: str) -> dict[str, str]:
        """The environment of a student's `autograder submit`: only the URL and their token."""
        return clean_environment(
            {"AUTOGRADER_URL": self.base_url, "AUTOGRADER_TOKEN": self.token(username)}
        )

    def headers(self, username: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(username)}"}


def autograder_command() -> str:
    """The `autograder` console script of the interpreter running the tests."""
    path = Path(sys.executable).parent / "autograder"
    if not path.is_file():
        pytest.fail(f"{path} not found: install the project (`make test` does) first")
    return str(path)


def run_autograder(
    *args: str, env: Mapping[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run one `autograder` command to completion and return what it printed."""
    return subprocess.run(
        [autograder_command(), *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build_demo(home: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`autograder demo --build-only` with the tiny options in ``home``; fails if it fails."""
    result = run_autograder(
        "demo", "--build-only", *DEMO_OPTIONS, env={**env, "AUTOGRADER_HOME": str(home)}, cwd=home
    )
    if result.returncode != 0:
        pytest.fail(
            f"autograder demo --build-only exited with code {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        raw = handle.read()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()


def marked_processes(marker: str) -> dict[int, str]:
    """Every live process (pid -> command line) whose environment carries ``marker``.

    Children of `autograder up` run in their own sessions and would be re-parented to init if
    orphaned, so neither the process tree nor the process group finds them; the environment does.
    """
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            if _environ(pid).get(MARKER_VARIABLE) == marker:
                found[pid] = _cmdline(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited while we looked, or not ours
    return found


def _describe(processes: Mapping[int, str]) -> str:
    return "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(processes.items()))


@dataclass
class RunningService:
    """An `autograder up` process tree started by :func:`start_service`."""

    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    marker: str

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/api/v1/health", timeout=5)
        return dict(response.json())

    def processes(self) -> dict[int, str]:
        return marked_processes(self.marker)

    def stop(self) -> None:
        """Ctrl-C the service, then assert it exited cleanly and left no process behind."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        try:
            code = self.process.wait(SERVICE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"autograder up did not exit within {SERVICE_STOP_TIMEOUT_S:.0f} s of SIGINT\n"
                f"{log_tail(self.log)}"
            )
        deadline = time.monotonic() + 5.0
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            self.kill()
            pytest.fail(
                f"after autograder up exited, {len(left)} process(es) it started are still "
                f"running (now killed):\n{_describe(left)}\n{log_tail(self.log)}"
            )
        assert code == 0, f"autograder up exited with code {code} on SIGINT\n{log_tail(self.log)}"

    def kill(self) -> None:
        """Teardown after a failure: SIGKILL the supervisor and every process it started.

        Does nothing once :meth:`stop` succeeded (the supervisor is reaped, nothing is marked).
        """
        if self.process.poll() is None:
            self.process.kill()  # Popen never signals a pid it has already reaped
        for pid in self.processes():
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        deadline = time.monotonic() + 5.0
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)


def _service_ready(base_url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            response = httpx.get(f"{base_url}/api/v1/health", timeout=2)
            body = response.json()
        except (httpx.HTTPError, ValueError):
            return False
        return body.get("status") == "ok" and len(body.get("workers") or []) >= 1

    return ready


def start_service(
    env: Mapping[str, str],
    *,
    base_url: str,
    directory: Path,
    timeout: float = SERVICE_START_TIMEOUT_S,
) -> RunningService:
    """Start `autograder up` in its own session and wait until health is ok with a live worker."""
    marker = uuid.uuid4().hex
    log = directory / f"autograder-up-{marker[:8]}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [autograder_command(), "up"],
            env={**env, MARKER_VARIABLE: marker},
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = RunningService(process=process, base_url=base_url, log=log, marker=marker)
    try:
        wait_for(
            _service_ready(base_url),
            timeout=timeout,
            process=process,
            what=f"autograder up (health at {base_url}/api/v1/health)",
            log=log,
            interval=0.5,
        )
    except BaseException:
        service.kill()
        raise
    return service
