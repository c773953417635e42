"""Assignments, phases, clean-image downloads, uploads and leaderboards."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response

from server.deps import AssignmentDep, CatalogDep, CurrentUser, SessionDep, SettingsDep
from server.errors import UploadTooLarge
from server.schemas import (
    AssignmentPublic,
    AssignmentsPublic,
    AssignmentSummary,
    LeaderboardPublic,
    QuotaPublic,
    SubmissionPublic,
)
from server.services import catalog_views, submissions
from server.services.leaderboard import leaderboard
from server.storage import receive_upload

router = APIRouter(prefix="/assignments", tags=["assignments"])


class DatasetFormat(StrEnum):
    ZIP = "zip"
    NPZ = "npz"


@router.get("", response_model=AssignmentsPublic)
def list_assignments(catalog: CatalogDep, _: CurrentUser) -> AssignmentsPublic:
    return AssignmentsPublic(
        data=[
            AssignmentSummary(
                slug=a.slug, title=a.title, timezone=a.timezone, phases=[p.id for p in a.phases]
            )
            for a in catalog.assignments.values()
        ]
    )


@router.get("/{slug}", response_model=AssignmentPublic)
def get_assignment(
    assignment: AssignmentDep, settings: SettingsDep, request: Request
) -> AssignmentPublic:
    return catalog_views.assignment_public(
        assignment=assignment, settings=settings, base_url=str(request.base_url).rstrip("/")
    )


@router.get(
    "/{slug}/phases/{phase_id}/dataset",
    responses={200: {"content": {"application/zip": {}, "application/octet-stream": {}}}},
)
def download_dataset(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    format: Annotated[DatasetFormat, Query()] = DatasetFormat.ZIP,
) -> Response:
    """The clean images to perturb (a zip of PNGs or an npz); never any hidden artifact."""
    phase = catalog.phase(assignment, phase_id)
    content = catalog_views.dataset_bytes(settings=settings, phase=phase, fmt=format.value)
    name = f"{assignment.slug}-{phase.id}-clean.{format.value}"
    media = "application/zip" if format is DatasetFormat.ZIP else "application/octet-stream"
    return Response(
        content, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


@router.post("/{slug}/phases/{phase_id}/submissions", status_code=202)
def submit(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    session: SessionDep,
    user: CurrentUser,
    request: Request,
    file: Annotated[UploadFile, File(description="zip of PNGs, .npy or .npz (see the README)")],
) -> SubmissionPublic:
    """Upload an attack batch; 202 with the queued submission, or a 4xx naming the problem."""
    phase = catalog.phase(assignment, phase_id)
    limit = min(phase.limits.max_upload_bytes, settings.max_upload_bytes)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise UploadTooLarge(
            f"The upload is {int(declared) / 2**20:.1f} MiB; this phase accepts at most "
            f"{limit / 2**20:.1f} MiB.",
            {"limit_bytes": limit},
        )
    upload = receive_upload(
        file.file,
        file_name=file.filename or "upload",
        limit=limit,
        directory=settings.upload_path / "incoming",
    )
    submission = submissions.create_submission(
        session=session,
        settings=settings,
        user=user,
        assignment=assignment,
        phase=phase,
        upload=upload,
    )
    return submissions.to_public(session, submission, viewer=user)


@router.get("/{slug}/phases/{phase_id}/quota", response_model=QuotaPublic)
def get_quota(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    user: CurrentUser,
) -> QuotaPublic:
    """What is left of your submissions today and in total, and when the day resets."""
    return submissions.quota(
        session=session, user=user, assignment=assignment, phase=catalog.phase(assignment, phase_id)
    )


@router.get("/{slug}/phases/{phase_id}/leaderboard", response_model=LeaderboardPublic)
def get_leaderboard(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    user: CurrentUser,
) -> LeaderboardPublic:
    return leaderboard(
        session=session,
        assignment=assignment,
        phase=catalog.phase(assignment, phase_id),
        viewer=user,
    )
