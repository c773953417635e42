"""Database engine, sessions and the declarative base with a stable naming convention."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    """Current time in UTC; every stored datetime is UTC."""
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


POOL_SIZE, POOL_OVERFLOW = 10, 20
POOL_CAPACITY = POOL_SIZE + POOL_OVERFLOW
"""Connections an engine holds at most; the API keeps its requests' sessions below this
(``Settings.api_db_sessions``)."""


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so the API and workers share it."""
    pool = {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def is_unreachable(exc: BaseException) -> bool:
    """True for a database error that a new connection may not meet again: the server is
    restarting or failing over, the connection dropped, the SQLite file stayed locked."""
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


DB_RETRY_S = 60.0
"""How long work that must not be lost (a score after hours of grading) waits for an unreachable
database before it gives up."""


def run_with_retry(
    session: Session, work: Callable[[], T], *, what: str, within_s: float = DB_RETRY_S
) -> T:
    """Run ``work`` (statements on ``session`` and their commit); while the database is
    unreachable, roll back and run it again on a new connection (the pool pings it first), with
    backoff, for up to ``within_s`` seconds before raising. ``work`` must be safe to repeat."""
    deadline = time.monotonic() + within_s
    delay = 0.5
    while True:
        try:
            return work()
        except DBAPIError as exc:
            session.rollback()
            left = deadline - time.monotonic()
            if not is_unreachable(exc) or left <= 0:
                raise
            pause = min(delay, left)
            log.warning("%s: database unreachable (%s); retrying in %.1f s", what, exc.orig, pause)
        time.sleep(pause)
        delay = min(2 * delay, 5.0)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that is always closed; callers commit themselves."""
    session = factory()
    try:
        yield session
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


_factories: dict[str, sessionmaker[Session]] = {}


def session_factory_for(url: str) -> sessionmaker[Session]:
    """One engine and session factory per database URL in this process."""
    factory = _factories.get(url)
    if factory is None:
        factory = _factories[url] = make_session_factory(make_engine(url))
    return factory


def forget_engines() -> None:
    """Drop engines inherited through ``fork`` without closing the parent's connections."""
    for factory in _factories.values():
        bind = factory.kw.get("bind")
        if bind is not None:
            bind.dispose(close=False)
    _factories.clear()
