"""Accounts over the API: roster import (staff), accepting an invitation, personal API tokens and
the leaderboard pseudonym."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from server.deps import CurrentUser, SessionDep, SettingsDep, StaffUser
from server.errors import UploadTooLarge
from server.models import ApiToken
from server.schemas import (
    InvitationIn,
    NewTokenPublic,
    PseudonymIn,
    RosterPublic,
    RosterStudentPublic,
    TokenIn,
    TokenPublic,
    TokensPublic,
    UserPublic,
)
from server.services import accounts

router = APIRouter(tags=["accounts"])


@router.post("/roster", response_model=RosterPublic)
def import_roster(
    session: SessionDep,
    settings: SettingsDep,
    user: StaffUser,
    file: Annotated[UploadFile, File(description="CSV with columns student_id,name,email")],
    reissue: Annotated[
        bool, Form(description="new codes even for students with a password")
    ] = False,
) -> RosterPublic:
    """Create or update the students of a CSV roster; each student without a password gets a
    one-time invitation code (shown only in this answer). One bad line imports nobody."""
    content = file.file.read(accounts.MAX_ROSTER_BYTES + 1)
    if len(content) > accounts.MAX_ROSTER_BYTES:
        raise UploadTooLarge(
            f"The roster is larger than {accounts.MAX_ROSTER_BYTES // 2**20} MiB; a roster of "
            f"{accounts.MAX_ROSTER_ROWS} students fits well within that. Upload only the CSV.",
            {"limit_bytes": accounts.MAX_ROSTER_BYTES},
        )
    imported = accounts.import_roster(
        session,
        actor=user,
        content=content,
        secret_key=settings.secret_key,
        lifetime_s=settings.invitation_lifetime_s,
        reissue=reissue,
    )
    return RosterPublic(
        students=[RosterStudentPublic(**vars(entry)) for entry in imported],
        created=sum(entry.created for entry in imported),
        invitations=sum(entry.invitation_code is not None for entry in imported),
        invitation_expires_in_days=settings.invitation_lifetime_s / 86400,
    )


@router.post("/invitations/accept", response_model=UserPublic)
def accept_invitation(body: InvitationIn, session: SessionDep, settings: SettingsDep) -> UserPublic:
    """Set your password with the invitation code from your TA (no token needed); then log in
    at /login."""
    user = accounts.accept_invitation(
        session,
        code=body.code,
        password=body.password,
        pseudonym=body.pseudonym,
        secret_key=settings.secret_key,
    )
    return UserPublic(username=user.username, role=user.role.value, pseudonym=user.pseudonym)


@router.patch("/me", response_model=UserPublic)
def update_me(body: PseudonymIn, session: SessionDep, user: CurrentUser) -> UserPublic:
    """Choose the pseudonym you appear under on leaderboards."""
    accounts.set_pseudonym(session, user, body.pseudonym)
    return UserPublic(username=user.username, role=user.role.value, pseudonym=user.pseudonym)


def _token_public(row: ApiToken) -> TokenPublic:
    return TokenPublic(
        id=row.id, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at
    )


@router.get("/me/tokens", response_model=TokensPublic)
def list_tokens(session: SessionDep, user: CurrentUser) -> TokensPublic:
    """Your API tokens (names and dates; the values are never shown again)."""
    return TokensPublic(data=[_token_public(row) for row in accounts.list_tokens(session, user)])


@router.post("/me/tokens", response_model=NewTokenPublic, status_code=201)
def create_token(
    body: TokenIn, session: SessionDep, settings: SettingsDep, user: CurrentUser
) -> NewTokenPublic:
    """A new personal API token; copy it now, it is shown only once."""
    token, row = accounts.create_token(
        session, user, name=body.name, secret_key=settings.secret_key
    )
    return NewTokenPublic(**_token_public(row).model_dump(), token=token)


@router.delete("/me/tokens/{token_id}", status_code=204)
def revoke_token(token_id: int, session: SessionDep, user: CurrentUser) -> Response:
    """Revoke one of your tokens; requests with it are refused from now on."""
    accounts.revoke_token(session, user, token_id)
    return Response(status_code=204)
