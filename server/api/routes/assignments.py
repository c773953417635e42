"""Assignments, phases, clean-image downloads, uploads and leaderboards."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from graders.defense_models import (
    MANIFEST_MAX_BYTES,
    DefenseManifest,
    parse_manifest,
    parse_manifest_json,
)
from graders.errors import SubmissionRejected
from server.assignments import PhaseSpec, Track
from server.deps import (
    AssignmentDep,
    CatalogDep,
    CurrentUser,
    OptionalUser,
    SessionDep,
    SettingsDep,
    public_or_logged_in,
)
from server.errors import NotFound
from server.schemas import (
    AssignmentPublic,
    AssignmentsPublic,
    AssignmentSummary,
    LeaderboardPublic,
    QuotaPublic,
    SubmissionPublic,
    TransferMatrixPublic,
)
from server.services import catalog_views, submissions
from server.services.boards import Board
from server.services.deadlines import due_for
from server.services.leaderboard import leaderboard, transfer_matrix
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
    assignment: AssignmentDep,
    settings: SettingsDep,
    session: SessionDep,
    user: CurrentUser,
    request: Request,
) -> AssignmentPublic:
    return catalog_views.assignment_public(
        assignment=assignment,
        settings=settings,
        base_url=str(request.base_url).rstrip("/"),
        deadlines={p.id: due_for(session, user, assignment, p) for p in assignment.phases},
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
    if phase.track is not Track.ATTACK:
        raise NotFound(
            f"Phase {phase.id!r} is a defense phase: its evaluation points are hidden and there "
            "is nothing to download. Upload a checkpoint instead."
        )
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
    response: Response,
    file: Annotated[
        UploadFile,
        File(
            description="attack phases: zip of PNGs, .npy or .npz; defense phases: a state_dict "
            "as .safetensors or .pt/.pth (see docs/submission-formats.md)"
        ),
    ],
    architecture: Annotated[str | None, Form(description="defense: registry name")] = None,
    normalization: Annotated[str | None, Form(description="defense: none or cifar10")] = None,
    mean: Annotated[str | None, Form(description="defense: R,G,B input mean")] = None,
    std: Annotated[str | None, Form(description="defense: R,G,B input std")] = None,
    manifest: Annotated[
        UploadFile | None, File(description="defense: JSON manifest instead of the form fields")
    ] = None,
) -> SubmissionPublic:
    """Upload an attack batch or a defense checkpoint; 202 with the queued submission, 200 with
    the earlier submission (`reused: true`) when the same file was already scored in this phase,
    or a 4xx naming the problem (nothing is stored or counted then)."""
    phase = catalog.phase(assignment, phase_id)
    parsed = _defense_manifest(phase, architecture, normalization, mean, std, manifest)
    upload = receive_upload(  # the body was capped while it streamed in: server.upload_limits
        file.file,
        file_name=file.filename or "upload",
        limit=submissions.upload_limit(settings=settings, phase=phase),
        directory=settings.upload_path / "incoming",
    )
    accepted = submissions.create_submission(
        session=session,
        settings=settings,
        user=user,
        assignment=assignment,
        phase=phase,
        upload=upload,
        manifest=parsed,
    )
    if accepted.reused:
        response.status_code = 200
    public = submissions.to_public(session, accepted.submission, viewer=user)
    return public.model_copy(update={"reused": accepted.reused})


def _defense_manifest(
    phase: PhaseSpec,
    architecture: str | None,
    normalization: str | None,
    mean: str | None,
    std: str | None,
    manifest: UploadFile | None,
) -> DefenseManifest | None:
    """The checked manifest of a defense upload (form fields or a JSON file), before any bytes
    of the checkpoint are stored; ``None`` for attack phases, which take no such fields."""
    fields = {"architecture": architecture, "normalization": normalization, "mean": mean}
    fields["std"] = std
    given = sorted(k for k, v in fields.items() if v is not None)
    if phase.defense is None:
        if given or manifest is not None:
            raise SubmissionRejected(
                "unexpected_fields",
                f"Phase {phase.id!r} is an attack phase; it takes only the `file` field, not "
                f"{', '.join(given) or 'manifest'}.",
            )
        return None
    allowed = phase.defense.allowed_architectures
    if manifest is not None:
        if given:
            raise SubmissionRejected(
                "invalid_manifest",
                "Give the architecture and normalization either as form fields or in the "
                f"manifest file, not both (form fields given: {', '.join(given)}).",
            )
        return parse_manifest_json(manifest.file.read(MANIFEST_MAX_BYTES + 1), allowed=allowed)
    return parse_manifest(
        architecture=architecture, normalization=normalization, mean=mean, std=std, allowed=allowed
    )


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
    slug: str,
    phase_id: str,
    catalog: CatalogDep,
    session: SessionDep,
    user: OptionalUser,
    board: Annotated[
        Board | None,
        Query(description="public or private; default: private once it is open, else public"),
    ] = None,
) -> LeaderboardPublic:
    """The phase's ranking; without a token only when the course makes leaderboards public.
    The private board (which decides grades) opens when the phase closes; staff see it always."""
    assignment = public_or_logged_in(catalog, slug, user)
    return leaderboard(
        session=session,
        assignment=assignment,
        phase=catalog.phase(assignment, phase_id),
        viewer=user,
        board=board,
    )


@router.get("/{slug}/phases/{phase_id}/transfer", response_model=TransferMatrixPublic)
def get_transfer_matrix(
    phase_id: str,
    assignment: AssignmentDep,
    catalog: CatalogDep,
    session: SessionDep,
    user: CurrentUser,
) -> TransferMatrixPublic:
    """Defense x attack transfer matrix of a defense phase (staff: all rows; students: theirs)."""
    phase = catalog.phase(assignment, phase_id)
    if phase.defense is None:
        raise NotFound(
            f"Phase {phase.id!r} is an attack phase; transfer matrices belong to defense phases."
        )
    return transfer_matrix(session=session, assignment=assignment, phase=phase, viewer=user)
