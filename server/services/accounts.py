"""Accounts a student manages or receives: roster import with one-time invitations, accepting an
invitation (setting a password), personal API tokens and the leaderboard pseudonym."""

from __future__ import annotations

import csv
import io
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from server.db import utcnow
from server.errors import Conflict, NotFound, ServiceError
from server.models import ApiToken, AuditAction, AuditEvent, Invitation, Role, User
from server.security import (
    MIN_PASSWORD_LENGTH,
    WeakPassword,
    create_user,
    hash_token,
    issue_token,
    set_password,
)

ROSTER_COLUMNS = ("student_id", "name", "email")
MAX_ROSTER_BYTES = 1024 * 1024
MAX_ROSTER_ROWS = 5000
MAX_ERRORS_SHOWN = 20
INVITATION_PREFIX = "inv_"
STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PSEUDONYM = re.compile(r"^[a-z0-9][a-z0-9-]{2,31}$")
MAX_TOKENS = 20
FORMULA_PREFIXES = ("=", "+", "-", "@")
"""A cell starting with one of these is a formula to a spreadsheet (CSV injection), and names
and emails go into the grade exports TAs open in one."""
_INVISIBLE_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""Bidirectional controls, which make a name display as something else."""


class InvalidRoster(ServiceError):
    status, code = 422, "invalid_roster"


class InvalidInvitation(ServiceError):
    status, code = 400, "invalid_invitation"


@dataclass(frozen=True)
class RosterEntry:
    student_id: str
    name: str
    email: str
    line: int


@dataclass(frozen=True)
class Imported:
    student_id: str
    name: str
    email: str
    created: bool
    invitation_code: str | None
    """Shown once; ``None`` when the student already set a password."""


def parse_roster(content: bytes) -> list[RosterEntry]:
    """The roster's rows, or :class:`InvalidRoster` listing every problem with its line."""
    if len(content) > MAX_ROSTER_BYTES:
        raise InvalidRoster(
            f"The roster is {len(content) / 2**20:.1f} MiB; at most "
            f"{MAX_ROSTER_BYTES // 2**20} MiB ({MAX_ROSTER_ROWS} students) is accepted."
        )
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRoster(
            f"The roster is not UTF-8 text (byte {exc.start}); export it as CSV (UTF-8)."
        ) from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in reader.fieldnames or []]
    except csv.Error as exc:
        raise _unreadable(reader, exc) from None
    missing = [column for column in ROSTER_COLUMNS if column not in header]
    if missing:
        raise InvalidRoster(
            f"The roster's first line must name the columns {', '.join(ROSTER_COLUMNS)}; "
            f"missing: {', '.join(missing)} (found: {', '.join(header) or 'nothing'}).",
            {"expected_columns": list(ROSTER_COLUMNS)},
        )
    reader.fieldnames = header
    entries: list[RosterEntry] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            if len(entries) >= MAX_ROSTER_ROWS:
                raise InvalidRoster(f"The roster has more than {MAX_ROSTER_ROWS} students.")
            student_id, name, email = ((row.get(c) or "").strip() for c in ROSTER_COLUMNS)
            if not (student_id or name or email):
                continue  # a blank line
            errors += _row_problems(line, student_id, name, email, seen)
            seen.setdefault(student_id, line)
            entries.append(RosterEntry(student_id, name, email, line))
    except csv.Error as exc:
        raise _unreadable(reader, exc) from None
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f" (and {len(errors) - len(shown)} more)" if len(errors) > len(shown) else ""
        raise InvalidRoster(
            f"The roster has {len(errors)} problem(s); nothing was imported. "
            + "; ".join(shown)
            + more,
            {"errors": errors},
        )
    if not entries:
        raise InvalidRoster("The roster has a header but no students.")
    return entries


def _unreadable(reader: csv.DictReader[str], exc: csv.Error) -> InvalidRoster:
    """csv's own refusal (a field over its 128 KiB limit: no roster has one), with the line."""
    return InvalidRoster(
        f"The roster cannot be read as CSV: line {reader.line_num + 1}: {exc}. Export it "
        "again as CSV with the columns student_id,name,email."
    )


def _row_problems(
    line: int, student_id: str, name: str, email: str, seen: dict[str, int]
) -> list[str]:
    problems = []
    if not STUDENT_ID.match(student_id):
        problems.append(
            f"line {line}: student_id {student_id!r} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    elif student_id in seen:
        problems.append(f"line {line}: student_id {student_id} also on line {seen[student_id]}")
    if not name or len(name) > 255:
        problems.append(f"line {line}: name must be 1-255 characters")
    if not EMAIL.match(email) or len(email) > 255:
        problems.append(f"line {line}: email {email!r} is not an address")
    for column, value in (("name", name), ("email", email)):
        if value.startswith(FORMULA_PREFIXES):
            problems.append(
                f"line {line}: {column} {value[:40]!r} starts with {value[0]!r}, which makes it a "
                "formula in a spreadsheet; remove that character"
            )
        if any(
            unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _INVISIBLE_CONTROLS
            for ch in value
        ):
            problems.append(
                f"line {line}: {column} contains a control character (shown escaped: "
                f"{ascii(value[:40])}); remove it"
            )
    return problems


def _new_invitation(
    session: Session, user: User, *, actor: User | None, secret_key: str, lifetime_s: float
) -> str:
    session.execute(
        delete(Invitation).where(Invitation.user_id == user.id, Invitation.used_at.is_(None))
    )
    code = INVITATION_PREFIX + secrets.token_urlsafe(18)
    session.add(
        Invitation(
            user_id=user.id,
            code_hash=hash_token(code, secret_key),
            created_by_id=actor.id if actor is not None else None,
            expires_at=utcnow() + timedelta(seconds=lifetime_s),
        )
    )
    return code


def import_roster(
    session: Session,
    *,
    actor: User | None,
    content: bytes,
    secret_key: str,
    lifetime_s: float,
    reissue: bool = False,
) -> list[Imported]:
    """Create (or update the name and email of) every student in the CSV; each student without
    a password gets a fresh one-time invitation code (``reissue``: even those with one). All or
    nothing: a single bad line imports nobody. ``actor`` is the staff member importing through
    the API (recorded in the audit log); ``None`` from the command line."""
    entries = parse_roster(content)
    existing = {
        user.username: user
        for user in session.scalars(
            select(User).where(User.username.in_([e.student_id for e in entries]))
        )
    }
    staff = [
        e.student_id
        for e in entries
        if e.student_id in existing and existing[e.student_id].role.is_staff
    ]
    if staff:
        raise InvalidRoster(
            f"{', '.join(staff)} already belong to course staff; a roster holds students only."
        )
    imported: list[Imported] = []
    for entry in entries:
        user = existing.get(entry.student_id)
        created = user is None
        if user is None:
            user = create_user(session, username=entry.student_id, role=Role.STUDENT)
        user.full_name, user.email = entry.name, entry.email
        code = None
        if user.password_hash is None or reissue:
            code = _new_invitation(
                session, user, actor=actor, secret_key=secret_key, lifetime_s=lifetime_s
            )
        imported.append(Imported(entry.student_id, entry.name, entry.email, created, code))
    if actor is not None:
        session.add(
            AuditEvent(
                actor_id=actor.id,
                action=AuditAction.ROSTER_IMPORTED,
                reason="roster import",
                details={
                    "students": len(imported),
                    "created": sum(i.created for i in imported),
                    "invitations": sum(i.invitation_code is not None for i in imported),
                },
            )
        )
    session.commit()
    return imported


def accept_invitation(
    session: Session, *, code: str, password: str, pseudonym: str | None, secret_key: str
) -> User:
    """Set the invited student's password (and pseudonym, if given); the code then stops working."""
    invitation = session.scalar(
        select(Invitation).where(Invitation.code_hash == hash_token(code.strip(), secret_key))
    )
    if invitation is None or invitation.used_at is not None:
        raise InvalidInvitation(
            "This invitation code is unknown or was already used; ask your TA for a new one."
        )
    if invitation.expires_at <= utcnow():
        raise InvalidInvitation("This invitation code has expired; ask your TA for a new one.")
    user = invitation.user
    try:
        set_password(user, password)
    except WeakPassword as exc:
        raise InvalidInvitation(
            f"Choose a password of at least {MIN_PASSWORD_LENGTH} characters."
        ) from exc
    if pseudonym:
        set_pseudonym(session, user, pseudonym, commit=False)
    invitation.used_at = utcnow()
    session.commit()
    return user


def set_pseudonym(session: Session, user: User, pseudonym: str, *, commit: bool = True) -> User:
    """Change the name the user appears under on leaderboards."""
    name = pseudonym.strip().lower()
    if not PSEUDONYM.match(name):
        raise ServiceError(
            "A pseudonym is 3-32 characters: lowercase letters, digits and '-', starting with a "
            f"letter or digit (got {pseudonym!r})."
        )
    taken = session.scalar(select(User.id).where(User.pseudonym == name, User.id != user.id))
    if taken is not None:
        raise Conflict(f"The pseudonym {name!r} is taken; choose another.")
    user.pseudonym = name
    if commit:
        session.commit()
    return user


def list_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(
        session.scalars(
            select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at)
        ).all()
    )


def create_token(
    session: Session, user: User, *, name: str, secret_key: str
) -> tuple[str, ApiToken]:
    """A new personal token; its value is returned once and only its HMAC is kept."""
    live = [t for t in list_tokens(session, user) if t.revoked_at is None]
    if len(live) >= MAX_TOKENS:
        raise Conflict(f"You have {MAX_TOKENS} active tokens; revoke one you no longer use.")
    token = issue_token(session, user=user, secret_key=secret_key, name=name.strip() or "token")
    row = session.scalars(
        select(ApiToken).where(ApiToken.token_hash == hash_token(token, secret_key))
    ).one()
    session.commit()
    return token, row


def revoke_token(session: Session, user: User, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"You have no token {token_id}.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row
