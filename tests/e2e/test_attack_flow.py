"""The attack phase end to end, on the real processes: demo build, `autograder up` (uvicorn and a
Celery worker), downloads, CLI and REST submissions, scoring, leaderboard, access control, stop.

Run once on the embedded setup (SQLite, Celery over SQLite) and once on production's (PostgreSQL,
Redis); the flow and its assertions are the same.
"""

from __future__ import annotations

import io
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.servers import EMBEDDED, PRODUCTION, Deployment, RunningService, run_autograder

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EPS = 8
ASSIGNMENT, PHASE = "demo", "attack"
PHASE_URL = f"/api/v1/assignments/{ASSIGNMENT}/phases/{PHASE}"
SCORE_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------------------------------
# Building attack batches


def sign_noise(clean: np.ndarray, seed: int) -> np.ndarray:
    """A valid attack: +-eps on every channel, clipped to [0, 255] (so within L-inf eps)."""
    noise = np.random.default_rng(seed).choice([-EPS, EPS], size=clean.shape)
    return np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def read_png_zip(content: bytes) -> dict[str, np.ndarray]:
    """The PNG images of a zip, by name, as uint8 32 x 32 x 3 arrays (README, CSV skipped)."""
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {
            name: np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB"))
            for name in archive.namelist()
            if name.endswith(".png")
        }


def write_png_zip(path: Path, images: dict[str, np.ndarray]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, pixels in images.items():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            archive.writestr(name, buffer.getvalue())
    return path


def one_pixel_too_far(clean: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """``adv`` with a single channel of pixel (0, 0) moved 9 away from the clean value."""
    out = adv.copy()
    value = int(clean[0, 0, 0])
    out[0, 0, 0] = value + EPS + 1 if value <= 255 - (EPS + 1) else value - (EPS + 1)
    return out


# ---------------------------------------------------------------------------------------------
# Talking to the service


def get(deployment: Deployment, user: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{deployment.base_url}{path}",
        headers=deployment.headers(user),
        params=params,
        timeout=30,
    )


def cli_submit(deployment: Deployment, user: str, batch: Path, cwd: Path) -> Any:
    """`autograder submit demo attack FILE --wait` as ``user``, through the installed CLI."""
    return run_autograder(
        "submit",
        ASSIGNMENT,
        PHASE,
        str(batch),
        "--wait",
        "--timeout",
        str(SCORE_TIMEOUT_S),
        env=deployment.client_env(user),
        cwd=cwd,
        timeout=SCORE_TIMEOUT_S + 30,
    )


def wait_scored(deployment: Deployment, user: str, submission_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + SCORE_TIMEOUT_S
    while True:
        response = get(deployment, user, f"/api/v1/submissions/{submission_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in {"scored", "failed", "cancelled"}:
            assert body["status"] == "scored", body
            return body
        assert time.monotonic() < deadline, f"not scored after {SCORE_TIMEOUT_S:.0f} s: {body}"
        time.sleep(0.5)


def files_under(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()


def assert_scored_report(submission: dict[str, Any], n_images: int) -> None:
    assert submission["status"] == "scored", submission
    assert submission["evaluator_version"], submission
    results = submission["results"]
    assert results["n_images"] == n_images
    assert len(results["models"]) == 3, results["models"]
    for model in results["models"]:
        assert 0.0 <= model["adversarial_accuracy"] <= 1.0, model
        assert 0.0 <= model["clean_accuracy"] <= 1.0, model
    assert sum(results["fooled_by_k"]) == n_images, results["fooled_by_k"]
    assert 0.0 <= submission["score"] <= 1.0
    hashes = results["hashes"]
    assert re.fullmatch(r"[0-9a-f]{64}", hashes["evaluation_set"]), hashes
    assert sorted(hashes["hidden_models"]) == sorted(m["name"] for m in results["models"])


# ---------------------------------------------------------------------------------------------
# The flow


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "deployment",
    [pytest.param(EMBEDDED), pytest.param(PRODUCTION, marks=pytest.mark.production)],
    indirect=True,
)
def test_attack_phase_end_to_end(
    deployment: Deployment, service: RunningService, tmp_path: Path
) -> None:
    # The service runs what it was configured with, and health names the live worker.
    health = service.health()
    assert health["status"] == "ok", health
    assert health["database"]["ok"] and health["broker"]["ok"], health
    assert len(health["workers"]) >= 1, health
    running = service.processes()
    assert any("uvicorn" in cmd for cmd in running.values()), running
    assert any("celery" in cmd for cmd in running.values()), running
    if deployment.name == PRODUCTION:
        assert not (deployment.home / "autograder.db").exists()
        assert not (deployment.home / "broker.db").exists()

    # alice downloads the clean images, the same in both formats.
    response = get(deployment, "alice", f"{PHASE_URL}/dataset", format="zip")
    assert response.status_code == 200, response.text
    clean = read_png_zip(response.content)
    response = get(deployment, "alice", f"{PHASE_URL}/dataset", format="npz")
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
        images, names = npz["images"], [str(n) for n in npz["names"]]
    n_images = len(names)
    assert images.dtype == np.uint8 and images.shape == (n_images, 32, 32, 3)
    assert sorted(clean) == sorted(names)
    for index, name in enumerate(names):
        np.testing.assert_array_equal(clean[name], images[index], err_msg=name)

    # alice attacks every image within L-inf 8 and submits with the CLI, waiting for the score.
    adversarial = {
        name: sign_noise(pixels, seed=i) for i, (name, pixels) in enumerate(clean.items())
    }
    result = cli_submit(
        deployment, "alice", write_png_zip(tmp_path / "adv.zip", adversarial), tmp_path
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "scored" in result.stdout, result.stdout
    match = re.search(r"submission ([0-9a-f]+): scored", result.stdout)
    assert match, result.stdout
    alice_id = match.group(1)

    response = get(deployment, "alice", f"/api/v1/submissions/{alice_id}")
    assert response.status_code == 200, response.text
    alice_submission = response.json()
    assert_scored_report(alice_submission, n_images)

    # One channel of one image 9 away: refused by the CLI, naming the image; nothing is kept.
    offender = names[min(3, n_images - 1)]
    bad = dict(adversarial)
    bad[offender] = one_pixel_too_far(clean[offender], adversarial[offender])
    stored_before = files_under(deployment.home / "uploads")
    result = cli_submit(deployment, "alice", write_png_zip(tmp_path / "bad.zip", bad), tmp_path)
    assert result.returncode != 0, result.stdout
    assert "threat_model_violated" in result.stderr, result.stderr
    assert offender in result.stderr, result.stderr
    assert "scored" not in result.stdout, result.stdout
    response = get(deployment, "alice", "/api/v1/submissions")
    assert response.status_code == 200, response.text
    listed = response.json()
    assert listed["count"] == 1 and [s["id"] for s in listed["data"]] == [alice_id], listed
    assert files_under(deployment.home / "uploads") == stored_before

    # bob uploads a .npy (uint8 N x 32 x 32 x 3) through the REST API.
    buffer = io.BytesIO()
    np.save(buffer, sign_noise(images, seed=1234), allow_pickle=False)
    response = httpx.post(
        f"{deployment.base_url}{PHASE_URL}/submissions",
        headers=deployment.headers("bob"),
        files={"file": ("adv.npy", buffer.getvalue(), "application/octet-stream")},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] in {"queued", "running"}, response.json()
    bob_submission = wait_scored(deployment, "bob", response.json()["id"])
    assert_scored_report(bob_submission, n_images)

    # carol sees both on the leaderboard under pseudonyms, best (lowest) score first.
    pseudonyms = {}
    for user in ("alice", "bob"):
        response = get(deployment, user, "/api/v1/me")
        assert response.status_code == 200, response.text
        pseudonyms[user] = response.json()["pseudonym"]
    response = get(deployment, "carol", f"{PHASE_URL}/leaderboard")
    assert response.status_code == 200, response.text
    entries = response.json()["entries"]
    assert {e["pseudonym"] for e in entries} == set(pseudonyms.values()), entries
    assert all(e["username"] is None for e in entries), entries
    assert not any(name in response.text for name in ("alice", "bob", "carol")), response.text
    scores = [e["score"] for e in entries]
    assert scores == sorted(scores) and [e["rank"] for e in entries] == [1, 2], entries
    by_pseudonym = {e["pseudonym"]: e["score"] for e in entries}
    assert by_pseudonym[pseudonyms["alice"]] == pytest.approx(alice_submission["score"])
    assert by_pseudonym[pseudonyms["bob"]] == pytest.approx(bob_submission["score"])

    # carol cannot read alice's submission; it does not even exist for her.
    response = get(deployment, "carol", f"/api/v1/submissions/{alice_id}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found", response.text

    # carol uploads the demo's baseline defense with its manifest through the CLI; the worker
    # evaluates it on the gpu queue with both suites and the two attack batches as transfer.
    baseline = deployment.credentials["baseline_defense"]
    result = run_autograder(
        "submit",
        ASSIGNMENT,
        "defense",
        baseline["checkpoint"],
        "--manifest",
        baseline["manifest"],
        "--wait",
        "--timeout",
        str(SCORE_TIMEOUT_S),
        env=deployment.client_env("carol"),
        cwd=tmp_path,
        timeout=SCORE_TIMEOUT_S + 30,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    match = re.search(r"submission ([0-9a-f]+): scored: robust accuracy", result.stdout)
    assert match, result.stdout
    defense = get(deployment, "carol", f"/api/v1/submissions/{match.group(1)}").json()
    results = defense["results"]
    assert set(results["suites"]) == {"quick", "full"}, results
    assert 0.0 <= defense["score"] <= results["clean_accuracy"] <= 1.0
    assert results["evaluator_version"] == defense["evaluator_version"] == "defense-1.0.0"
    assert sorted(t["attack_submission_id"] for t in results["transfer"]) == sorted(
        [alice_id, bob_submission["id"]]
    )
    matrix = get(deployment, "ta", "/api/v1/assignments/demo/phases/defense/transfer").json()
    assert [len(row["cells"]) for row in matrix["rows"]] == [2], matrix

    if deployment.postgres is not None:  # the rows really live in PostgreSQL
        with deployment.postgres.connect() as connection:
            row = connection.execute("SELECT count(*) FROM submission").fetchone()
        assert row is not None and row[0] == 3

    health = service.health()
    assert health["status"] == "ok" and len(health["workers"]) >= 1, health

    # Ctrl-C stops the supervisor, uvicorn, the Celery worker and its pool: nothing is left.
    service.stop()
