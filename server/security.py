"""Users, passwords, API tokens and web sessions.

API tokens and session cookies are random, shown once, and stored only as an HMAC; passwords are
stored as argon2 hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from server.db import utcnow
from server.models import ApiToken, Role, User, WebSession

TOKEN_PREFIX = "agt_"
_ADJECTIVES = (
    "amber",
    "brave",
    "calm",
    "clever",
    "crimson",
    "daring",
    "eager",
    "fuzzy",
    "gentle",
    "golden",
    "happy",
    "icy",
    "jolly",
    "keen",
    "lucky",
    "mellow",
    "nimble",
    "odd",
    "quiet",
    "rapid",
    "silent",
    "sly",
    "swift",
    "tidy",
    "vivid",
    "witty",
    "zesty",
    "bold",
    "cosmic",
    "dusty",
)
_ANIMALS = (
    "otter",
    "falcon",
    "lynx",
    "badger",
    "heron",
    "koala",
    "marten",
    "newt",
    "ocelot",
    "panda",
    "quokka",
    "raven",
    "salmon",
    "tapir",
    "urchin",
    "viper",
    "walrus",
    "yak",
    "zebra",
    "bison",
    "gecko",
    "ibis",
    "jackal",
    "lemur",
    "moose",
    "narwhal",
    "orca",
    "puffin",
    "stoat",
    "wombat",
)


def hash_token(token: str, secret_key: str) -> str:
    return hmac.new(secret_key.encode(), token.encode(), hashlib.sha256).hexdigest()


def generate_pseudonym(session: Session) -> str:
    """A leaderboard name like ``swift-otter-42`` not used by anyone yet."""
    while True:
        name = (
            f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_ANIMALS)}-{secrets.randbelow(100):02d}"
        )
        if session.scalar(select(User.id).where(User.pseudonym == name)) is None:
            return name


def create_user(
    session: Session, *, username: str, role: Role, pseudonym: str | None = None
) -> User:
    """Add a user (not committed: the caller owns the transaction)."""
    user = User(username=username, role=role, pseudonym=pseudonym or generate_pseudonym(session))
    session.add(user)
    session.flush()
    return user


def issue_token(session: Session, *, user: User, secret_key: str, name: str = "default") -> str:
    """A new API token for ``user``; the plain value is returned once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, name=name, token_hash=hash_token(token, secret_key)))
    session.flush()
    return token


def user_for_token(session: Session, *, token: str, secret_key: str) -> User | None:
    """The owner of an unrevoked token, or ``None``."""
    return session.scalar(
        select(User)
        .join(ApiToken, ApiToken.user_id == User.id)
        .where(ApiToken.token_hash == hash_token(token, secret_key), ApiToken.revoked_at.is_(None))
    )


def revoke_tokens(session: Session, *, user: User) -> int:
    count = 0
    for token in user.tokens:
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            count += 1
    return count


MIN_PASSWORD_LENGTH = 8
_hasher = PasswordHasher()
_UNUSABLE_HASH = _hasher.hash(secrets.token_urlsafe(16))
"""Verified against when the user is unknown, so a wrong username costs as long as a wrong
password and timing does not tell which usernames exist."""


class WeakPassword(ValueError):
    """A password too short to set."""


def set_password(user: User, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    user.password_hash = _hasher.hash(password)


def verify_password(user: User, password: str) -> bool:
    if user.password_hash is None:
        return False
    try:
        return _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def login(session: Session, *, username: str, password: str) -> User | None:
    """The user whose password this is, or ``None`` (unknown user, no password or wrong one)."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None or user.password_hash is None:
        try:
            _hasher.verify(_UNUSABLE_HASH, password)
        except VerificationError:
            pass
        return None
    return user if verify_password(user, password) else None


def start_session(
    session: Session, *, user: User, secret_key: str, lifetime_s: float
) -> tuple[str, WebSession]:
    """A new browser session for ``user``: the raw cookie value (never stored) and its row
    (added, not committed)."""
    token = secrets.token_urlsafe(32)
    row = WebSession(
        user_id=user.id,
        token_hash=hash_token(token, secret_key),
        csrf_token=secrets.token_urlsafe(32),
        expires_at=utcnow() + timedelta(seconds=lifetime_s),
    )
    session.add(row)
    session.flush()
    return token, row


def session_for_cookie(session: Session, *, token: str, secret_key: str) -> WebSession | None:
    """The live (unexpired, unrevoked) session whose cookie this is, or ``None``."""
    return session.scalar(
        select(WebSession)
        .options(joinedload(WebSession.user))
        .where(
            WebSession.token_hash == hash_token(token, secret_key),
            WebSession.revoked_at.is_(None),
            WebSession.expires_at > utcnow(),
        )
    )


def end_session(web_session: WebSession) -> None:
    web_session.revoked_at = utcnow()
