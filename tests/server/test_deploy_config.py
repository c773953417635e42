"""The deployment files (docker-compose.yml, Dockerfile.gpu, .dockerignore) agree with the code.

No Docker engine is needed: the files are parsed and checked against Settings, the CLI, the app
factory, pyproject.toml and requirements.lock.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import inspect
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from pydantic import AliasChoices, ValidationError
from sqlalchemy.engine import make_url

from server import cli
from server.api.routes import system
from server.config import Environment, Settings
from server.main import API_PREFIX
from server.supervisor import api_command

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("migrate", "api", "worker", "worker-gpu")
LONG_RUNNING_APP_SERVICES = ("api", "worker", "worker-gpu")
WORKER_SERVICES = ("worker", "worker-gpu")
REQUIRED_SETTINGS = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "AUTOGRADER_SECRET_KEY",
    "AUTOGRADER_ENVIRONMENT",
)
SAMPLE_SECRET = "s3cret-" + "x" * 41
# Host variables the operator exports; any other `${VAR:?...}` resolves to "sample-<var>".
SAMPLE_HOST_ENV = {
    "AUTOGRADER_SECRET_KEY": SAMPLE_SECRET,
    "POSTGRES_PASSWORD": "sample-db-password",
    "HIDDEN_DATA_DIR": "/srv/hidden-data",
}

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """A `${VAR:?message}` whose variable the host environment does not set."""


def interpolate(value: str, host_env: Mapping[str, str]) -> str:
    """Resolve compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `$$`."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = host_env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else str(current)
        if op in (":?", "?"):
            if missing:
                raise MissingVariable(f"{name}: {arg}")
            return str(current)
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def resolve(node: Any, host_env: Mapping[str, str]) -> Any:
    """``node`` with every string value interpolated (mapping keys are left as they are)."""
    if isinstance(node, str):
        return interpolate(node, host_env)
    if isinstance(node, list):
        return [resolve(item, host_env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, host_env) for key, value in node.items()}
    return node


def required_host_variables(node: Any) -> set[str]:
    """Every variable used as `${VAR:?...}` or `${VAR?...}` anywhere in ``node``."""
    if isinstance(node, str):
        return {
            m.group("name") for m in _INTERPOLATION.finditer(node) if m.group("op") in (":?", "?")
        }
    values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return set().union(*(required_host_variables(value) for value in values))


def sample_host_env(compose: Mapping[str, Any]) -> dict[str, str]:
    env = {name: f"sample-{name.lower()}" for name in required_host_variables(compose)}
    return {**env, **SAMPLE_HOST_ENV}


def settings_env_names() -> set[str]:
    """The environment variables Settings reads, derived from its fields (upper-cased)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's two forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {
        str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in env.items()
    }


def argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def option(args: list[str], name: str) -> str | None:
    """The value after ``name`` (or of ``name=value``) in ``args``."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def parse_cli(args: list[str]) -> argparse.Namespace:
    """``autograder ARGS`` as the CLI parses it; a command it does not know fails the test."""
    try:
        return cli.build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`autograder {' '.join(args)}` is not a command of server.cli")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continuation line"
    return instructions


def copy_sources(arguments: str) -> list[str]:
    parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
    return [p.strip("/").removeprefix("./") or "." for p in parts[:-1]]


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def resolved(compose: dict[str, Any]) -> dict[str, Any]:
    """The compose file as Docker would see it with the operator's variables exported."""
    return dict(resolve(compose, sample_host_env(compose))["services"])


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No variable Settings reads leaks in from the test runner's environment."""
    accepted = settings_env_names()
    for name in list(os.environ):
        if name.upper() in accepted:
            monkeypatch.delenv(name)
    yield monkeypatch


# --- the helpers themselves ----------------------------------------------------------------------


def test_settings_env_names_follow_the_settings_class() -> None:
    names = settings_env_names()
    assert len(names) >= len(Settings.model_fields)
    assert {"DATABASE_URL", "CELERY_BROKER_URL", "AUTOGRADER_SECRET_KEY"} <= names
    assert "AUTOGRADER_DATABASE_URL" in names  # the second alias choice
    assert "SECRET_KEY" not in names and "AUTOGRADER_NOT_A_SETTING" not in names


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate("a${SET}b$$c", env) == "avalueb$c"
    defaults = "${UNSET:-fallback}|${EMPTY:-fallback}|${EMPTY-kept}"
    assert interpolate(defaults, env) == "fallback|fallback|"
    assert interpolate("${SET:?needed}", env) == "value"
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?needed}", env)


# --- docker-compose.yml: configuration ----------------------------------------------------------


def test_the_stack_has_its_services(services: dict[str, Any]) -> None:
    assert {"postgres", "redis", *APP_SERVICES} <= set(services)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_environment_names_are_settings(services: dict[str, Any], name: str) -> None:
    service = services[name]
    assert "env_file" not in service, "configuration goes through `environment` only"
    unknown = {key for key in environment(service) if key.upper() not in settings_env_names()}
    assert not unknown, f"{name} sets variables Settings does not read: {sorted(unknown)}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_set_the_required_settings(services: dict[str, Any], name: str) -> None:
    env = environment(services[name])
    missing = [key for key in REQUIRED_SETTINGS if not env.get(key)]
    assert not missing, f"{name} does not set {missing}"
    assert env["AUTOGRADER_ENVIRONMENT"] == Environment.PRODUCTION.value


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_share_the_env_anchor(
    compose: dict[str, Any], services: dict[str, Any], name: str
) -> None:
    shared = compose.get("x-autograder-env")
    assert isinstance(shared, dict) and shared
    env = environment(services[name])
    assert {k: env.get(k) for k in shared} == environment({"environment": shared})


@pytest.mark.parametrize("name", APP_SERVICES)
def test_secret_key_is_required_from_the_host(
    compose: dict[str, Any], services: dict[str, Any], name: str
) -> None:
    raw = environment(services[name])["AUTOGRADER_SECRET_KEY"]
    assert re.fullmatch(r"\$\{AUTOGRADER_SECRET_KEY:\?[^}]+\}", raw), raw
    host_env = {k: v for k, v in sample_host_env(compose).items() if k != "AUTOGRADER_SECRET_KEY"}
    with pytest.raises(MissingVariable, match="AUTOGRADER_SECRET_KEY"):
        interpolate(raw, host_env)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_settings_validate_from_the_compose_environment(
    resolved: dict[str, Any], clean_env: pytest.MonkeyPatch, name: str
) -> None:
    env = environment(resolved[name])
    for key, value in env.items():
        clean_env.setenv(key, value)
    settings = Settings()
    assert settings.environment is Environment.PRODUCTION
    assert settings.secret_key == SAMPLE_SECRET
    assert settings.db_url == env["DATABASE_URL"]
    assert settings.broker_url == env["CELERY_BROKER_URL"]
    assert not settings.is_embedded_broker
    clean_env.setenv("AUTOGRADER_SECRET_KEY", "too-short")
    with pytest.raises(ValidationError, match="AUTOGRADER_SECRET_KEY"):
        Settings()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_database_url_is_psycopg3_on_the_postgres_service(
    resolved: dict[str, Any], name: str
) -> None:
    url = make_url(environment(resolved[name])["DATABASE_URL"])
    assert url.drivername == "postgresql+psycopg"
    assert "psycopg" in lock_pins()
    postgres = environment(resolved["postgres"])
    assert url.host == "postgres" and "postgres" in resolved
    assert url.username == postgres["POSTGRES_USER"]
    assert url.database == postgres["POSTGRES_DB"]
    assert url.password == postgres["POSTGRES_PASSWORD"] == SAMPLE_HOST_ENV["POSTGRES_PASSWORD"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_broker_url_is_the_redis_service(resolved: dict[str, Any], name: str) -> None:
    url = urlsplit(environment(resolved[name])["CELERY_BROKER_URL"])
    assert url.scheme == "redis"
    assert url.hostname == "redis" and "redis" in resolved


def test_postgres_password_is_required_from_the_host(services: dict[str, Any]) -> None:
    raw = environment(services["postgres"])["POSTGRES_PASSWORD"]
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate(raw, {})
    assert services["postgres"]["image"].split(":")[1].split(".")[0] == "15"


def test_redis_persists_with_appendonly(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].split(":")[1].split(".")[0] == "7"
    command = argv(redis.get("command"))
    assert option(command, "--appendonly") == "yes", command
    assert any(str(volume).endswith(":/data") for volume in redis.get("volumes", []))


# --- docker-compose.yml: health and start-up order -----------------------------------------------


def test_each_healthcheck_has_a_test_command(services: dict[str, Any]) -> None:
    checked = {name: s["healthcheck"] for name, s in services.items() if "healthcheck" in s}
    assert {"postgres", "redis", "api"} <= set(checked)
    for name, healthcheck in checked.items():
        test = healthcheck.get("test")
        assert test, f"{name}: healthcheck without a test"
        if isinstance(test, list):
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"


def test_service_healthy_conditions_have_healthchecks(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"


def test_postgres_and_redis_healthchecks(services: dict[str, Any]) -> None:
    postgres = argv(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in postgres
    assert option(postgres, "--username") == environment(services["postgres"])["POSTGRES_USER"]
    redis = argv(services["redis"]["healthcheck"]["test"])
    assert redis[-2:] == ["redis-cli", "ping"]


def test_api_healthcheck_gets_the_health_route(services: dict[str, Any]) -> None:
    test = " ".join(argv(services["api"]["healthcheck"]["test"]))
    urls = re.findall(r"https?://[^\s'\"]+", test)
    assert len(urls) == 1, test
    url = urlsplit(urls[0])
    routes = {API_PREFIX + getattr(route, "path", "") for route in system.router.routes}
    assert url.path in routes and url.path.endswith("/health")
    assert str(url.port) == option(argv(services["api"]["entrypoint"]), "--port")
    assert "curl" in test or "httpx" in test


def test_migrate_waits_for_a_healthy_postgres(services: dict[str, Any]) -> None:
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"].get("restart", "no") == "no"


@pytest.mark.parametrize("name", LONG_RUNNING_APP_SERVICES)
def test_app_services_wait_for_migrations_and_redis(services: dict[str, Any], name: str) -> None:
    depends_on = services[name]["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert depends_on["redis"]["condition"] == "service_healthy"


# --- docker-compose.yml: GPU, images, volumes ----------------------------------------------------


def gpu_devices(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return list(((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or [])


def test_gpu_worker_reserves_an_nvidia_device(services: dict[str, Any]) -> None:
    gpu = services["worker-gpu"]
    devices = gpu_devices(gpu)
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["count"] == 1
    assert "gpu" in devices[0]["capabilities"]
    assert gpu.get("profiles") == ["gpu"]


@pytest.mark.parametrize("name", ["postgres", "redis", "migrate", "api", "worker"])
def test_the_stack_starts_without_a_gpu(services: dict[str, Any], name: str) -> None:
    assert not services[name].get("profiles"), f"{name} must start without a profile"
    assert not gpu_devices(services[name]), f"{name} must not reserve a GPU"


def test_app_services_run_the_dockerfile_image(services: dict[str, Any]) -> None:
    images = set()
    for name in APP_SERVICES:
        build = services[name].get("build") or {}
        assert build.get("dockerfile") == DOCKERFILE.name, name
        assert (ROOT / build.get("context", ".") / DOCKERFILE.name).resolve() == DOCKERFILE
        images.add(services[name].get("image"))
    assert len(images) == 1 and None not in images, images


def mounts(service: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Long-syntax mounts of a service by container path."""
    found = {}
    for volume in service.get("volumes", []):
        assert isinstance(volume, dict), f"use the long volume syntax: {volume!r}"
        found[volume["target"]] = volume
    return found


@pytest.mark.parametrize("name", LONG_RUNNING_APP_SERVICES)
def test_data_uploads_and_assignments_are_mounted(
    compose: dict[str, Any], resolved: dict[str, Any], name: str
) -> None:
    env = environment(resolved[name])
    by_target = mounts(resolved[name])
    data = by_target[env["AUTOGRADER_DATA_DIR"]]
    assert data["type"] == "bind" and data["read_only"] is True
    assert data["source"] == SAMPLE_HOST_ENV["HIDDEN_DATA_DIR"]
    assignments = by_target[env["AUTOGRADER_ASSIGNMENTS_DIR"]]
    assert assignments["type"] == "bind" and assignments["read_only"] is True
    uploads = by_target[env["AUTOGRADER_UPLOAD_DIR"]]
    assert uploads["type"] == "volume" and not uploads.get("read_only", False)
    assert uploads["source"] in (compose.get("volumes") or {})


def test_uploads_volume_is_shared(resolved: dict[str, Any]) -> None:
    sources = {
        mounts(resolved[name])[environment(resolved[name])["AUTOGRADER_UPLOAD_DIR"]]["source"]
        for name in LONG_RUNNING_APP_SERVICES
    }
    assert len(sources) == 1, sources


def test_api_runs_on_all_interfaces_on_its_settings_port(resolved: dict[str, Any]) -> None:
    api = resolved["api"]
    env = environment(api)
    command = argv(api["entrypoint"]) + argv(api.get("command"))
    assert option(command, "--host") == env["AUTOGRADER_HOST"] == "0.0.0.0"
    assert option(command, "--port") == env["AUTOGRADER_PORT"]
    assert "--proxy-headers" in command
    published = [str(port).rsplit(":", 1)[-1] for port in api.get("ports", [])]
    assert published == [env["AUTOGRADER_PORT"]]


# --- Dockerfile.gpu and .dockerignore -------------------------------------------------------------


def test_dockerfile_base_image_has_a_supported_python(
    instructions: list[tuple[str, str]], pyproject: dict[str, Any]
) -> None:
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert len(bases) == 1, bases
    match = re.fullmatch(r"python:(\d+\.\d+)(?:[.-].*)?", bases[0])
    assert match, f"expected a python:3.x base image, got {bases[0]}"
    assert match.group(1) in SpecifierSet(pyproject["project"]["requires-python"])


def test_dockerfile_runs_as_a_non_root_user(instructions: list[tuple[str, str]]) -> None:
    keywords = [keyword for keyword, _ in instructions]
    assert "USER" in keywords
    last_user = max(i for i, k in enumerate(keywords) if k == "USER")
    last_run = max(i for i, k in enumerate(keywords) if k == "RUN")
    assert last_user > last_run, "a RUN after the last USER runs as that user; keep USER last"
    user = instructions[last_user][1].split(":")[0]
    assert user not in ("root", "0")
    created = [a for k, a in instructions if k == "RUN" and re.search(r"\b(useradd|adduser)\b", a)]
    assert any(re.search(rf"\b{re.escape(user)}\s*(&&|$)", a) for a in created), user


def test_dockerfile_installs_the_package_with_the_lock(
    instructions: list[tuple[str, str]],
) -> None:
    installs = [
        (i, shlex.split(args))
        for i, (k, args) in enumerate(instructions)
        if k == "RUN" and "pip install" in args
    ]
    assert len(installs) == 1, installs
    index, tokens = installs[0]
    assert (
        option(tokens, "-c") == "requirements.lock"
        or option(tokens, "--constraint") == "requirements.lock"
    )
    assert "." in tokens, "install the project itself"
    assert not {"-e", "--editable"} & set(tokens), "the image installs the package, not editable"
    copied_before = {
        source for k, args in instructions[:index] if k == "COPY" for source in copy_sources(args)
    }
    assert "requirements.lock" in copied_before


def test_dockerfile_pins_agree_with_the_lock() -> None:
    pins = lock_pins()
    text = DOCKERFILE.read_text()
    found = re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([A-Za-z0-9.+!_-]+)", text)
    for name, version in found:
        key = canonicalize_name(name)
        assert pins.get(key) == version, f"Dockerfile pins {name}=={version}; lock: {pins.get(key)}"
    assert pins.get("torch") and pins.get("torchvision")


def test_dockerfile_copies_what_the_package_needs(
    instructions: list[tuple[str, str]], pyproject: dict[str, Any]
) -> None:
    copied = [s for k, args in instructions if k == "COPY" for s in copy_sources(args)]
    assert "." not in copied, "copy only what the image needs"
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", "requirements.lock", pyproject["project"]["readme"]}
    needed |= {pattern.rstrip("*") for pattern in packages}
    assert set(copied) == needed
    missing = sorted(source for source in copied if not (ROOT / source).exists())
    assert not missing, f"COPY sources missing from the repository (docker build fails): {missing}"


def test_dockerfile_sets_the_nvidia_runtime_variables(
    instructions: list[tuple[str, str]],
) -> None:
    env = dict(
        pair.split("=", 1) for k, args in instructions if k == "ENV" for pair in shlex.split(args)
    )
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    assert "compute" in env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(",")


def test_dockerfile_creates_the_upload_mount_point_for_its_user(
    instructions: list[tuple[str, str]], services: dict[str, Any]
) -> None:
    upload_dir = environment(services["worker"])["AUTOGRADER_UPLOAD_DIR"]
    runs = [args for k, args in instructions if k == "RUN"]
    assert any(upload_dir in args and "mkdir" in args and "chown" in args for args in runs)


def test_dockerfile_entrypoint_runs_the_worker(
    instructions: list[tuple[str, str]], pyproject: dict[str, Any]
) -> None:
    entrypoints = [args for k, args in instructions if k == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    command = json.loads(entrypoints[0])  # exec form: the worker gets the stop signal
    assert command[0] == "autograder"
    assert pyproject["project"]["scripts"]["autograder"] == "server.cli:main"
    assert parse_cli(command[1:]).func is cli.cmd_worker


def test_dockerignore_keeps_local_state_out_and_sources_in(
    instructions: list[tuple[str, str]],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".venv", ".git", ".autograder", "tests/artifacts"} <= set(patterns)
    copied = [s for k, args in instructions if k == "COPY" for s in copy_sources(args)]
    for source in copied:
        excluded = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(source, p)]
        assert not excluded, f"{source} is excluded by {excluded}"


# --- commands ------------------------------------------------------------------------------------


def effective_command(service: Mapping[str, Any], instructions: list[tuple[str, str]]) -> list[str]:
    """What the container runs: an overridden entrypoint drops the image's; command is appended."""
    if "entrypoint" in service:
        return argv(service["entrypoint"]) + argv(service.get("command"))
    image_entrypoint = json.loads(next(a for k, a in instructions if k == "ENTRYPOINT"))
    return image_entrypoint + argv(service.get("command"))


@pytest.mark.parametrize("name", APP_SERVICES)
def test_commands_invoke_existing_entry_points(
    resolved: dict[str, Any],
    instructions: list[tuple[str, str]],
    pyproject: dict[str, Any],
    name: str,
) -> None:
    command = effective_command(resolved[name], instructions)
    program = command[0]
    if program == "autograder":
        assert pyproject["project"]["scripts"]["autograder"] == "server.cli:main"
        args = parse_cli(command[1:])
        assert callable(args.func)
    elif program == "uvicorn":
        assert any(dep.startswith("uvicorn") for dep in pyproject["project"]["dependencies"])
        module_name, _, attribute = command[1].partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        assert callable(factory)
        assert "--factory" in command
        assert all(p.default is not p.empty for p in inspect.signature(factory).parameters.values())
    else:
        pytest.fail(f"{name} runs {program!r}, which is neither `autograder` nor `uvicorn`")


def test_expected_commands_per_service(
    resolved: dict[str, Any], instructions: list[tuple[str, str]], clean_env: pytest.MonkeyPatch
) -> None:
    migrate = parse_cli(effective_command(resolved["migrate"], instructions)[1:])
    assert migrate.func is cli.cmd_db_upgrade
    for name in WORKER_SERVICES:
        worker = parse_cli(effective_command(resolved[name], instructions)[1:])
        assert worker.func is cli.cmd_worker, name
    api = effective_command(resolved["api"], instructions)
    supervised = api_command(Settings())
    assert api[:3] == supervised[supervised.index("uvicorn") :][:3]  # uvicorn <app> --factory
