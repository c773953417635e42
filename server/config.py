"""The one settings class: every environment variable the service reads is declared here."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.db import POOL_CAPACITY

DEFAULT_SECRET_KEY = "dev-insecure-secret-change-me"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Service configuration, read from ``AUTOGRADER_*`` variables (and the two URLs below).

    Everything defaults to the embedded setup under ``AUTOGRADER_HOME`` (``.autograder``):
    a SQLite database file and Celery over kombu's SQLAlchemy transport on SQLite. Production sets
    ``DATABASE_URL`` (PostgreSQL via psycopg 3) and ``CELERY_BROKER_URL`` (Redis); the code path is
    the same.
    """

    model_config = SettingsConfigDict(
        env_prefix="AUTOGRADER_", extra="ignore", populate_by_name=True
    )

    environment: Environment = Environment.DEVELOPMENT
    secret_key: str = DEFAULT_SECRET_KEY
    home: Path = Path(".autograder")
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "AUTOGRADER_DATABASE_URL")
    )
    celery_broker_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CELERY_BROKER_URL", "AUTOGRADER_CELERY_BROKER_URL"),
    )
    data_dir: Path | None = None
    upload_dir: Path | None = None
    assignments_dir: Path = Path("assignments")
    cifar10_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    worker_concurrency: int = Field(default=1, ge=1)
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="scheduling niceness of the grading processes: on a machine they share with "
        "the API, uploads and pages are answered first and grading takes the CPU left over",
    )
    api_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="API processes `autograder up` starts (uvicorn --workers): one Python "
        "process answers from one core; with a Redis broker the rate-limit counters are shared, "
        "with the embedded one each process keeps its own",
    )
    api_db_sessions: int = Field(
        default=24,
        ge=1,
        le=POOL_CAPACITY - 2,
        description="requests of an API process that hold a database session at once; the rest "
        "wait their turn without holding a worker thread or a connection",
    )
    worker_queues: str = Field(
        default="cpu,gpu",
        pattern=r"^(cpu|gpu)(,(cpu|gpu))?$",
        description="queues a worker consumes: cpu (attack scoring), gpu (defense evaluation)",
    )
    broker_polling_interval_s: float = Field(default=0.1, gt=0)
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024,
        gt=0,
        description="hard cap on any upload; phases set their own, usually lower, limits",
    )
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    worker_stale_after_s: float = Field(default=30.0, gt=0)
    lease_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    requeue_queued_after_s: float = Field(
        default=600.0,
        gt=0,
        description="the sweeper sends a submission again if it is still queued this long after "
        "it was sent (its message may have been lost); a duplicate is skipped by the claim",
    )
    visibility_timeout_s: float = Field(
        default=6 * 3600,
        gt=0,
        description="Redis redelivers a task not acknowledged within this time; every phase's "
        "hard time limit must stay below it",
    )
    torch_threads: int | None = Field(default=None, ge=1)
    session_lifetime_s: float = Field(
        default=8 * 3600, gt=0, description="a browser login lasts this long, then asks again"
    )
    rate_limits: bool = Field(default=True, description="answer 429 past the limits below")
    upload_rate_per_user: str = Field(
        default="20/60", description="uploads per API token or login: COUNT/SECONDS"
    )
    upload_rate_per_address: str = Field(
        default="600/60", description="uploads per client address (a campus NAT shares one)"
    )
    login_rate_per_address: str = Field(
        default="30/300", description="login and invitation attempts per client address"
    )
    login_failures_per_user: str = Field(
        default="5/900", description="failed logins after which a username waits out the window"
    )
    invitation_lifetime_s: float = Field(
        default=14 * 24 * 3600, gt=0, description="how long a roster invitation code works"
    )
    secure_cookies: bool | None = Field(
        default=None,
        description="send the session cookie only over HTTPS; default: on in production",
    )

    @field_validator(
        "upload_rate_per_user",
        "upload_rate_per_address",
        "login_rate_per_address",
        "login_failures_per_user",
    )
    @classmethod
    def _rate(cls, value: str) -> str:
        from server.ratelimit import Rule

        Rule.parse(value)
        return value

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        home = self.home.resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{home / 'autograder.db'}"
        if self.celery_broker_url is None:
            self.celery_broker_url = f"sqla+sqlite:///{home / 'broker.db'}"
        if self.data_dir is None:
            self.data_dir = home / "data"
        if self.upload_dir is None:
            self.upload_dir = home / "uploads"
        if self.public_url is None:
            self.public_url = f"http://{self.host}:{self.port}"
        if self.secure_cookies is None:
            self.secure_cookies = self.environment is Environment.PRODUCTION
        if self.environment is Environment.PRODUCTION:
            if self.secret_key == DEFAULT_SECRET_KEY or len(self.secret_key) < 32:
                raise ValueError(
                    "AUTOGRADER_SECRET_KEY must be set to a random string of at least 32 "
                    "characters in production (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(48))'`); the development default is refused."
                )
            debug = [
                name
                for name, value in (
                    ("AUTOGRADER_RATE_LIMITS", self.rate_limits),
                    ("AUTOGRADER_SECURE_COOKIES", self.secure_cookies),
                )
                if not value
            ]
            if debug:
                raise ValueError(
                    f"{' and '.join(debug)} must stay on in production (they are for benchmarks "
                    "and local trials); remove the setting, and serve the API behind HTTPS."
                )
        return self

    @property
    def is_embedded_broker(self) -> bool:
        return str(self.celery_broker_url).startswith("sqla+")

    @property
    def db_url(self) -> str:
        """The database URL, always set after validation."""
        return str(self.database_url)

    @property
    def broker_url(self) -> str:
        return str(self.celery_broker_url)

    @property
    def data_path(self) -> Path:
        return Path(str(self.data_dir))

    @property
    def upload_path(self) -> Path:
        return Path(str(self.upload_dir))


@lru_cache
def get_settings() -> Settings:
    """Settings of this process, read once from the environment."""
    return Settings()
