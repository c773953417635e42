"""REST API: uploads, validation errors, visibility, quotas, leaderboard (TestClient, SQLite)."""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from server.db import session_factory_for
from server.main import create_app
from server.models import Submission, SubmissionStatus
from tests.conftest import PHASE, SLUG, Account, Artifacts, perturbed, spec_toml, write_spec
from worker.scoring import Outcome, run_scoring

BASE = f"/api/v1/assignments/{SLUG}/phases/{PHASE}"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def zip_of_pngs(images: np.ndarray, names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for image, name in zip(images, names, strict=True):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            archive.writestr(name, png.getvalue())
    return buffer.getvalue()


def submit(client: TestClient, account: Account, content: bytes, name: str = "adv.npy"):
    return client.post(
        f"{BASE}/submissions", headers=account.headers, files={"file": (name, content)}
    )


def count_rows(settings) -> int:
    with session_factory_for(settings.db_url)() as session:
        return int(session.scalar(select(func.count()).select_from(Submission)) or 0)


def test_requests_without_a_valid_token_are_refused(client: TestClient) -> None:
    missing = client.get("/api/v1/assignments")
    wrong = client.get("/api/v1/assignments", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"]["code"] == "not_authenticated"
    assert "token" in wrong.json()["error"]["message"]


def test_assignment_lists_phase_rules_without_hidden_details(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    listing = client.get("/api/v1/assignments", headers=accounts["alice"].headers).json()
    assert [a["slug"] for a in listing["data"]] == [SLUG]
    detail = client.get(f"/api/v1/assignments/{SLUG}", headers=accounts["alice"].headers)
    phase = detail.json()["phases"][0]
    assert phase["threat_model"] == {"norm": "linf", "eps": 8.0, "scale": "0-255 pixel values"}
    assert phase["n_images"] == len(artifacts.eval_set)
    assert phase["synthetic_images"] is True
    assert phase["hidden_model_count"] == 2
    assert "safetensors" not in detail.text and "resnet20" not in detail.text


def test_dataset_download_is_the_exact_clean_images(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    npz = client.get(f"{BASE}/dataset?format=npz", headers=accounts["alice"].headers)
    assert npz.status_code == 200
    with np.load(io.BytesIO(npz.content), allow_pickle=False) as data:
        np.testing.assert_array_equal(data["images"], artifacts.eval_set.images)
    zipped = client.get(f"{BASE}/dataset?format=zip", headers=accounts["alice"].headers)
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        first = artifacts.eval_set.names[0]
        pixels = np.asarray(Image.open(io.BytesIO(archive.read(first))))
    np.testing.assert_array_equal(pixels, artifacts.eval_set.images[0])
    bad = client.get(f"{BASE}/dataset?format=pickle", headers=accounts["alice"].headers)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_valid_batch_is_accepted_queued_then_scored_by_the_worker(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    batch = perturbed(artifacts.eval_set.images)
    response = submit(client, accounts["alice"], npy_bytes(batch))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["queue_position"] == 1
    assert run_scoring(body["id"], settings=settings, session_factory=db) is Outcome.SCORED
    scored = client.get(f"/api/v1/submissions/{body['id']}", headers=accounts["alice"].headers)
    result = scored.json()
    assert result["status"] == "scored"
    models = result["results"]["models"]
    assert [m["name"] for m in models] == ["net-a", "net-b"]
    assert models[1]["preprocessing"] == "jpeg(quality=75)"
    assert result["score"] == pytest.approx(np.mean([m["adversarial_accuracy"] for m in models]))
    assert sum(result["results"]["fooled_by_k"]) == len(batch)
    assert result["results"]["hashes"]["evaluation_set"] == artifacts.eval_sha
    assert result["evaluator_version"]


def test_zip_of_pngs_inside_a_folder_is_accepted(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    names = [f"adv/{name}" for name in artifacts.eval_set.names]
    content = zip_of_pngs(perturbed(artifacts.eval_set.images, 3), names)
    response = submit(client, accounts["alice"], content, "adv.zip")
    assert response.status_code == 202, response.text


def test_threat_model_violation_names_images_and_leaves_nothing(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings
) -> None:
    batch = perturbed(artifacts.eval_set.images)
    batch[3] = np.clip(artifacts.eval_set.images[3].astype(int) + 9, 0, 255).astype(np.uint8)
    response = submit(client, accounts["alice"], npy_bytes(batch))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "threat_model_violated"
    assert error["details"]["violations"][0]["image"] == artifacts.eval_set.names[3]
    assert error["details"]["violations"][0]["distance"] == 9
    assert count_rows(settings) == 0
    assert not list((settings.upload_path).rglob("*.npy"))


def test_oversized_upload_is_refused_with_413(
    client: TestClient, accounts: dict[str, Account], settings
) -> None:
    response = submit(client, accounts["alice"], b"\x93NUMPY" + b"0" * (1024 * 1024 + 10))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert count_rows(settings) == 0


def test_students_only_see_their_own_submissions(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts
) -> None:
    own = submit(client, accounts["alice"], npy_bytes(artifacts.eval_set.images)).json()
    peek = client.get(f"/api/v1/submissions/{own['id']}", headers=accounts["bob"].headers)
    assert peek.status_code == 404
    assert client.get("/api/v1/submissions", headers=accounts["bob"].headers).json()["count"] == 0
    as_ta = client.get("/api/v1/submissions", headers=accounts["ta"].headers).json()
    assert as_ta["count"] == 1 and as_ta["data"][0]["username"] == "alice"
    as_alice = client.get(f"/api/v1/submissions/{own['id']}", headers=accounts["alice"].headers)
    assert as_alice.json()["username"] is None and as_alice.json()["error_log"] is None


def test_daily_quota_counts_accepted_but_not_failed_submissions(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    write_spec(settings.assignments_dir, spec_toml(artifacts, max_per_day=2))
    with TestClient(create_app(settings)) as limited:
        content = npy_bytes(artifacts.eval_set.images)
        first = submit(limited, accounts["alice"], content).json()
        with db() as session:  # a failed submission is not charged
            session.get(Submission, first["id"]).status = SubmissionStatus.FAILED
            session.commit()
        assert submit(limited, accounts["alice"], content).status_code == 202
        assert submit(limited, accounts["alice"], content).status_code == 202
        refused = submit(limited, accounts["alice"], content)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "quota_exceeded"
        assert "resets at" in refused.json()["error"]["message"]
        quota = limited.get(f"{BASE}/quota", headers=accounts["alice"].headers).json()
        assert quota["used_today"] == 2 and quota["max_per_day"] == 2


def test_closed_phase_refuses_with_the_window_in_course_time(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings
) -> None:
    due = datetime(2020, 3, 1, 17, 0, tzinfo=UTC)
    write_spec(
        settings.assignments_dir,
        spec_toml(artifacts, opens_at=due - timedelta(days=7), due_at=due),
    )
    with TestClient(create_app(settings)) as closed:
        response = submit(closed, accounts["alice"], npy_bytes(artifacts.eval_set.images))
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "phase_closed"
    assert "2020-03-01 12:00 EST" in error["message"]  # 17:00 UTC in New York
    assert count_rows(settings) == 0


def test_leaderboard_ranks_best_score_per_student_pseudonymously(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    def scored(account: Account, score: float) -> str:
        body = submit(client, account, npy_bytes(artifacts.eval_set.images)).json()
        with db() as session:
            row = session.get(Submission, body["id"])
            row.status, row.score = SubmissionStatus.SCORED, score
            session.commit()
        return body["id"]

    scored(accounts["alice"], 0.6)
    best_alice = scored(accounts["alice"], 0.2)
    scored(accounts["bob"], 0.4)
    scored(accounts["alice"], 0.5)
    board = client.get(f"{BASE}/leaderboard", headers=accounts["bob"].headers).json()
    entries = board["entries"]
    assert [e["score"] for e in entries] == [0.2, 0.4]
    assert entries[0]["submissions"] == 3 and entries[1]["is_you"] is True
    assert all(e["username"] is None for e in entries)
    assert entries[0]["submission_id"] is None  # bob cannot see alice's submission id
    as_ta = client.get(f"{BASE}/leaderboard", headers=accounts["ta"].headers).json()
    assert as_ta["entries"][0]["username"] == "alice"
    assert as_ta["entries"][0]["submission_id"] == best_alice


def test_health_reports_components(client: TestClient) -> None:
    body = client.get("/api/v1/health").json()
    assert body["database"]["ok"] is True
    assert body["broker"]["ok"] is True
    assert body["workers"] == [] and body["status"] == "degraded"


def test_unknown_phase_and_assignment_are_404_with_hints(
    client: TestClient, accounts: dict[str, Account]
) -> None:
    phase = client.get(
        f"/api/v1/assignments/{SLUG}/phases/nope/leaderboard", headers=accounts["alice"].headers
    )
    assert phase.status_code == 404 and PHASE in phase.json()["error"]["message"]
    missing = client.get("/api/v1/assignments/nope", headers=accounts["alice"].headers)
    assert missing.status_code == 404


def test_identical_file_already_scored_reuses_the_result_without_charging(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    content = npy_bytes(perturbed(artifacts.eval_set.images))
    first = submit(client, accounts["alice"], content).json()
    while_queued = submit(client, accounts["alice"], content)  # not scored yet: a new submission
    assert while_queued.status_code == 202 and while_queued.json()["id"] != first["id"]
    assert run_scoring(first["id"], settings=settings, session_factory=db) is Outcome.SCORED
    used = client.get(f"{BASE}/quota", headers=accounts["alice"].headers).json()["used_total"]

    again = submit(client, accounts["alice"], content, name="renamed.npy")
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["reused"] is True and body["id"] == first["id"] and body["status"] == "scored"
    assert count_rows(settings) == 2
    quota = client.get(f"{BASE}/quota", headers=accounts["alice"].headers).json()
    assert quota["used_total"] == used
    assert not list((settings.upload_path / "incoming").glob("*"))

    other_student = submit(client, accounts["bob"], content)  # reuse is per student
    assert other_student.status_code == 202 and other_student.json()["reused"] is False

    with db() as session:  # scored under another evaluator or hidden model: graded again
        session.get(Submission, first["id"]).scoring_key = "0" * 64
        session.commit()
    regraded = submit(client, accounts["alice"], content)
    assert regraded.status_code == 202 and regraded.json()["id"] != first["id"]
