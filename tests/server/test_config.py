"""Settings: embedded defaults derive from the home folder; production refuses weak secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import DEFAULT_SECRET_KEY, Environment, Settings


def test_embedded_defaults_live_under_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.db_url == f"sqlite:///{tmp_path / 'autograder.db'}"
    assert settings.broker_url.startswith("sqla+sqlite:///") and settings.is_embedded_broker
    assert settings.data_path == tmp_path / "data"


def test_production_urls_come_from_the_standard_variables(monkeypatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u:p@db/autograder")
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("AUTOGRADER_DATA_DIR", "/srv/hidden")
    settings = Settings()
    assert settings.db_url == "postgresql+psycopg://u:p@db/autograder"
    assert not settings.is_embedded_broker
    assert settings.data_path == Path("/srv/hidden")


@pytest.mark.parametrize("secret", [DEFAULT_SECRET_KEY, "short"])
def test_production_refuses_default_or_short_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="AUTOGRADER_SECRET_KEY"):
        Settings(environment=Environment.PRODUCTION, secret_key=secret)


def test_production_accepts_a_real_secret() -> None:
    settings = Settings(environment="production", secret_key="x" * 48)
    assert settings.environment is Environment.PRODUCTION


@pytest.mark.parametrize("setting", ["rate_limits", "secure_cookies"])
def test_production_refuses_debug_settings(setting: str) -> None:
    with pytest.raises(ValidationError, match=f"AUTOGRADER_{setting.upper()} must stay on"):
        Settings(environment="production", secret_key="x" * 48, **{setting: False})
    assert getattr(Settings(secret_key="x" * 48, **{setting: False}), setting) is False
