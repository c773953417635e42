"""Users and API tokens: tokens are random, shown once, and stored only as an HMAC."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db import utcnow
from server.models import ApiToken, Role, User

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
    row = session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(token, secret_key), ApiToken.revoked_at.is_(None)
        )
    )
    return row.user if row is not None else None


def revoke_tokens(session: Session, *, user: User) -> int:
    count = 0
    for token in user.tokens:
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            count += 1
    return count
