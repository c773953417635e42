"""Score receipts: what a submission was scored with and what it got, signed by the server, for
appeals. The server checks a receipt it is shown: its signature, and whether the record still
says the same (a regrade or an override since then shows up as a difference)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from sqlalchemy.orm import Session

from server.db import utcnow
from server.errors import Conflict
from server.models import Submission, SubmissionStatus

RECEIPT_VERSION = 1
SIGNATURE_PREFIX = "hmac-sha256:"
_COMPARED = (
    "username",
    "assignment",
    "phase",
    "file_sha256",
    "evaluator_version",
    "seed",
    "evaluation_set_sha256",
    "hidden_model_sha256",
    "score",
    "final_score",
    "scored_at",
)
"""The fields a verification compares with the current record (not ``issued_at``)."""


def _signing_key(secret_key: str) -> bytes:
    """A key used only for receipts, so a receipt signature is never a valid token hash."""
    return hmac.new(secret_key.encode(), b"autograder receipt v1", hashlib.sha256).digest()


def _canonical(receipt: dict[str, Any]) -> bytes:
    return json.dumps(receipt, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(receipt: dict[str, Any], secret_key: str) -> str:
    digest = hmac.new(_signing_key(secret_key), _canonical(receipt), hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def _facts(submission: Submission) -> dict[str, Any]:
    results = submission.results or {}
    hashes = results.get("hashes") or {}
    return {
        "submission_id": submission.id,
        "username": submission.user.username,
        "assignment": submission.assignment_slug,
        "phase": submission.phase_id,
        "file_sha256": submission.file_sha256,
        "evaluator_version": submission.evaluator_version,
        "seed": results.get("seed"),
        "evaluation_set_sha256": hashes.get("evaluation_set"),
        "hidden_model_sha256": hashes.get("hidden_models") or {},
        "score": submission.score,
        "final_score": submission.final_score,
        "scored_at": submission.finished_at.isoformat() if submission.finished_at else None,
    }


def issue_receipt(submission: Submission, secret_key: str) -> dict[str, Any]:
    """The signed receipt of a scored submission."""
    if submission.status is not SubmissionStatus.SCORED:
        raise Conflict(
            f"Submission {submission.id} is {submission.status.value}; receipts are issued for "
            "scored submissions only."
        )
    receipt = {"version": RECEIPT_VERSION, **_facts(submission), "issued_at": utcnow().isoformat()}
    return {"receipt": receipt, "signature": sign(receipt, secret_key)}


def verify_receipt(
    session: Session, receipt: dict[str, Any], signature: str, secret_key: str
) -> dict[str, Any]:
    """Whether this server signed ``receipt``, and how it differs from the record now."""
    valid = hmac.compare_digest(sign(receipt, secret_key), signature)
    if not valid:
        return {"valid": False, "matches_record": False, "differences": {}}
    submission = session.get(Submission, str(receipt.get("submission_id")))
    if submission is None:
        return {"valid": True, "matches_record": False, "differences": {"submission_id": "gone"}}
    now = _facts(submission)
    differences = {
        key: {"receipt": receipt.get(key), "now": now[key]}
        for key in _COMPARED
        if receipt.get(key) != now[key]
    }
    return {"valid": True, "matches_record": not differences, "differences": differences}
