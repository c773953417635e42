"""Defense uploads over the REST API: manifests, strict checkpoint checks, nothing left behind on
a refusal, the phase view, the leaderboard direction and the transfer matrix's visibility."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from graders.architectures import Architecture, build_model
from graders.checkpoints import write_safetensors
from server.db import session_factory_for
from server.main import create_app
from server.models import Submission, SubmissionStatus, TransferResult
from tests.conftest import DEFENSE_PHASE, PHASE, SLUG, Account, Artifacts, spec_toml, write_spec

BASE = f"/api/v1/assignments/{SLUG}/phases/{DEFENSE_PHASE}"
CIFAR = {"architecture": "resnet20", "normalization": "cifar10"}
PLAIN = {"architecture": "resnet20", "normalization": "none"}


@pytest.fixture
def client(settings, db, artifacts: Artifacts) -> Iterator[TestClient]:
    write_spec(settings.assignments_dir, spec_toml(artifacts, defense=""))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def safetensors_bytes(model: torch.nn.Module, tmp_path: Path) -> bytes:
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors"
    write_safetensors(model, path)
    return path.read_bytes()


def torch_bytes(state: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def upload(client: TestClient, account: Account, content: bytes, name: str, **fields: str):
    return client.post(
        f"{BASE}/submissions", headers=account.headers, files={"file": (name, content)}, data=fields
    )


def nothing_stored(settings) -> bool:
    with session_factory_for(settings.db_url)() as session:
        rows = session.scalar(select(func.count()).select_from(Submission))
    stored = [p for p in settings.upload_path.rglob("*") if p.is_file()]
    return rows == 0 and stored == []


def test_valid_checkpoint_is_queued_for_the_gpu_queue_with_its_manifest(
    client: TestClient, accounts: dict[str, Account], settings, tmp_path: Path
) -> None:
    content = safetensors_bytes(build_model(Architecture.RESNET20), tmp_path)
    response = upload(client, accounts["alice"], content, "model.safetensors", **CIFAR)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["manifest"]["architecture"] == "resnet20"
    assert body["manifest"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    with session_factory_for(settings.db_url)() as session:
        row = session.get(Submission, body["id"])
        assert row.queue == "gpu" and row.batch_path.endswith(".safetensors")


def test_state_dict_in_a_pt_file_and_a_json_manifest_are_accepted(
    client: TestClient, accounts: dict[str, Account]
) -> None:
    state = {"state_dict": build_model(Architecture.RESNET20).net.state_dict(), "epoch": 3}
    manifest = json.dumps({"architecture": "resnet20", "mean": [0, 0, 0], "std": [1, 1, 1]})
    response = client.post(
        f"{BASE}/submissions",
        headers=accounts["alice"].headers,
        files={"file": ("model.pt", torch_bytes(state)), "manifest": ("m.json", manifest)},
    )
    assert response.status_code == 202, response.text
    assert response.json()["manifest"]["std"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({}, "invalid_manifest", "architecture"),
        ({"architecture": "resnet20"}, "invalid_manifest", "normalization"),
        (
            {"architecture": "resnet18", "normalization": "none"},
            "architecture_not_allowed",
            "allows",
        ),
        ({"architecture": "vgg16", "normalization": "none"}, "architecture_not_allowed", "Unknown"),
        ({"architecture": "resnet20", "normalization": "imagenet"}, "invalid_manifest", "none"),
        ({"architecture": "resnet20", "mean": "0,0"}, "invalid_manifest", "std"),
        (
            {"architecture": "resnet20", "mean": "0,0,0", "std": "1,0,1"},
            "invalid_manifest",
            "> 0",
        ),
    ],
)
def test_bad_manifests_are_refused_before_anything_is_stored(
    client: TestClient,
    accounts: dict[str, Account],
    settings,
    tmp_path: Path,
    fields: dict[str, str],
    code: str,
    fragment: str,
) -> None:
    content = safetensors_bytes(build_model(Architecture.RESNET20), tmp_path)
    response = upload(client, accounts["alice"], content, "model.safetensors", **fields)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == code and fragment in error["message"]
    assert nothing_stored(settings)


def test_checkpoint_of_another_architecture_names_the_keys(
    client: TestClient, accounts: dict[str, Account], settings, tmp_path: Path
) -> None:
    content = safetensors_bytes(build_model(Architecture.RESNET56), tmp_path)
    response = upload(client, accounts["alice"], content, "model.safetensors", **CIFAR)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_checkpoint"
    assert "unexpected key(s): layer1.3" in error["message"]
    assert nothing_stored(settings)


def test_shape_mismatch_shows_both_shapes(
    client: TestClient, accounts: dict[str, Account], settings, tmp_path: Path
) -> None:
    content = safetensors_bytes(build_model(Architecture.RESNET20, num_classes=100), tmp_path)
    response = upload(client, accounts["alice"], content, "model.safetensors", **CIFAR)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "linear.weight (checkpoint (100, 64), model (10, 64))" in message
    assert nothing_stored(settings)


def test_non_finite_weights_are_refused(
    client: TestClient, accounts: dict[str, Account], settings
) -> None:
    state = build_model(Architecture.RESNET20).net.state_dict()
    state["linear.bias"][3] = float("nan")
    response = upload(client, accounts["alice"], torch_bytes(state), "model.pt", **CIFAR)
    assert response.status_code == 422
    assert "NaN or infinite" in response.json()["error"]["message"]
    assert nothing_stored(settings)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


@pytest.mark.parametrize("container", ["raw pickle", "torch.save zip"])
def test_pickled_code_in_a_pt_file_is_refused_and_never_runs(
    client: TestClient, accounts: dict[str, Account], settings, tmp_path: Path, container: str
) -> None:
    marker = tmp_path / "pwned"
    payload = {"linear.weight": _Payload(marker)}
    content = pickle.dumps(payload) if container == "raw pickle" else torch_bytes(payload)
    assert not marker.exists()
    response = upload(client, accounts["alice"], content, "model.pt", **CIFAR)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_checkpoint"
    assert not marker.exists()
    assert nothing_stored(settings)


def test_wrong_file_type_and_oversized_checkpoints_are_refused(
    client: TestClient, accounts: dict[str, Account], settings
) -> None:
    wrong = upload(client, accounts["alice"], b"\x93NUMPY....", "batch.npy", **CIFAR)
    assert wrong.status_code == 422
    assert wrong.json()["error"]["code"] == "unsupported_checkpoint"
    big = upload(client, accounts["alice"], b"0" * (4 * 1024 * 1024 + 1), "m.pt", **CIFAR)
    assert big.status_code == 413
    assert nothing_stored(settings)


def test_attack_phase_refuses_defense_fields(
    client: TestClient, accounts: dict[str, Account], artifacts: Artifacts, settings
) -> None:
    response = client.post(
        f"/api/v1/assignments/{SLUG}/phases/{PHASE}/submissions",
        headers=accounts["alice"].headers,
        files={"file": ("adv.npy", b"x")},
        data={"architecture": "resnet20"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unexpected_fields"
    assert nothing_stored(settings)


def test_phase_view_describes_the_defense_and_hides_its_points(
    client: TestClient, accounts: dict[str, Account]
) -> None:
    view = client.get(f"/api/v1/assignments/{SLUG}", headers=accounts["alice"].headers).json()
    phase = next(p for p in view["phases"] if p["id"] == DEFENSE_PHASE)
    assert (
        phase["metric"] == "robust_accuracy" and "higher is better" in phase["metric_description"]
    )
    assert phase["defense"]["allowed_architectures"] == ["resnet20"]
    assert phase["defense"]["suites"]["full"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert phase["defense"]["suites"]["quick"] == ["pgd", "apgd-ce"]
    assert phase["dataset_urls"] == {}
    download = client.get(f"{BASE}/dataset", headers=accounts["alice"].headers)
    assert download.status_code == 404 and "hidden" in download.json()["error"]["message"]


def _scored(settings, account: Account, phase: str, score: float, when: int) -> str:
    from datetime import timedelta

    from server.db import utcnow

    with session_factory_for(settings.db_url)() as session:
        row = Submission(
            user_id=account.user_id,
            assignment_slug=SLUG,
            phase_id=phase,
            status=SubmissionStatus.SCORED,
            file_name="x",
            file_sha256="0" * 64,
            file_size=1,
            batch_path="/nonexistent",
            score=score,
            created_at=utcnow() - timedelta(minutes=when),
        )
        session.add(row)
        session.commit()
        return row.id


def test_defense_leaderboard_ranks_higher_robust_accuracy_first(
    client: TestClient, accounts: dict[str, Account], settings
) -> None:
    _scored(settings, accounts["alice"], DEFENSE_PHASE, 0.30, when=5)
    _scored(settings, accounts["alice"], DEFENSE_PHASE, 0.20, when=4)
    _scored(settings, accounts["bob"], DEFENSE_PHASE, 0.45, when=3)
    board = client.get(f"{BASE}/leaderboard", headers=accounts["ta"].headers).json()
    assert [(e["username"], e["score"]) for e in board["entries"]] == [
        ("bob", 0.45),
        ("alice", 0.30),
    ]
    assert "higher is better" in board["selection"]


def test_transfer_matrix_shows_students_only_their_own_rows(
    client: TestClient, accounts: dict[str, Account], settings
) -> None:
    alice_def = _scored(settings, accounts["alice"], DEFENSE_PHASE, 0.3, when=5)
    bob_def = _scored(settings, accounts["bob"], DEFENSE_PHASE, 0.4, when=4)
    bob_att = _scored(settings, accounts["bob"], PHASE, 0.1, when=3)
    with session_factory_for(settings.db_url)() as session:
        for defense, accuracy in ((alice_def, 0.25), (bob_def, 0.5)):
            session.add(
                TransferResult(
                    defense_submission_id=defense,
                    attack_submission_id=bob_att,
                    accuracy=accuracy,
                    n_points=20,
                )
            )
        session.commit()
    staff = client.get(f"{BASE}/transfer", headers=accounts["ta"].headers).json()
    assert {r["defender"]: r["cells"][0]["accuracy"] for r in staff["rows"]} == {
        "alice": 0.25,
        "bob": 0.5,
    }
    mine = client.get(f"{BASE}/transfer", headers=accounts["alice"].headers).json()
    assert [r["defense_submission_id"] for r in mine["rows"]] == [alice_def]
    assert mine["rows"][0]["cells"][0]["attack_submission_id"] is None
    assert mine["rows"][0]["cells"][0]["attacker"] != "bob"
    attack_phase = client.get(
        f"/api/v1/assignments/{SLUG}/phases/{PHASE}/transfer", headers=accounts["ta"].headers
    )
    assert attack_phase.status_code == 404


def test_identical_checkpoint_reuses_its_score_only_under_the_same_manifest(
    client: TestClient, accounts: dict[str, Account], settings, tmp_path: Path
) -> None:
    content = safetensors_bytes(build_model(Architecture.RESNET20), tmp_path)
    first = upload(client, accounts["alice"], content, "model.safetensors", **CIFAR).json()
    phase = client.app.state.catalog.assignments[SLUG].phase(DEFENSE_PHASE)
    with session_factory_for(settings.db_url)() as session:  # as the worker records a score
        row = session.get(Submission, first["id"])
        row.status, row.score, row.scoring_key = SubmissionStatus.SCORED, 0.4, phase.scoring_key
        session.commit()

    again = upload(client, accounts["alice"], content, "same.safetensors", **CIFAR)
    assert again.status_code == 200 and again.json()["reused"] is True
    assert again.json()["id"] == first["id"] and again.json()["score"] == 0.4
    plain = upload(client, accounts["alice"], content, "m.safetensors", **PLAIN)
    assert plain.status_code == 202 and plain.json()["id"] != first["id"]
