"""Public and private boards, reveal, final selection (best, last, marked), feedback granularity
and grade export with points, at their boundaries."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from server.assignments import SpecError, load_assignment
from server.db import utcnow
from server.main import create_app
from server.models import Submission, SubmissionStatus, User
from server.services.boards import private_score, public_points, public_score
from tests.conftest import PHASE, SLUG, Account, Artifacts, spec_toml, write_spec

BASE = f"/api/v1/assignments/{SLUG}/phases/{PHASE}"
LIMITS = "max_upload_mb = 1 }"


def spec(artifacts: Artifacts, board: str = "", grading: str = "", **kwargs) -> str:
    extra = ""
    if board:
        extra += f"\nleaderboard = {{ {board} }}"
    if grading:
        extra += f"\ngrading = {{ {grading} }}"
    return spec_toml(artifacts, **kwargs).replace(LIMITS, LIMITS + extra, 1)


def add_scored(db, account: Account, net_a: float, net_b: float, minutes_ago: int, **values) -> str:
    """A scored attack submission with these per-model accuracies (score: their mean)."""
    with db() as session:
        row = Submission(
            user_id=account.user_id,
            assignment_slug=SLUG,
            phase_id=PHASE,
            status=values.pop("status", SubmissionStatus.SCORED),
            file_name="adv.npy",
            file_sha256=f"{minutes_ago:064d}",
            file_size=1,
            batch_path="/nonexistent",
            score=(net_a + net_b) / 2,
            results={
                "metric": "mean_accuracy",
                "score": (net_a + net_b) / 2,
                "models": [
                    {"name": "net-a", "adversarial_accuracy": net_a},
                    {"name": "net-b", "adversarial_accuracy": net_b},
                ],
            },
            created_at=utcnow() - timedelta(minutes=minutes_ago),
            finished_at=utcnow() - timedelta(minutes=minutes_ago) + timedelta(seconds=5),
            **values,
        )
        session.add(row)
        session.commit()
        return row.id


def board(client: TestClient, account: Account, which: str | None = None):
    query = f"?board={which}" if which else ""
    return client.get(f"{BASE}/leaderboard{query}", headers=account.headers)


def test_public_board_uses_the_public_models_rounded_and_hides_details_until_reveal(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    text = spec(
        artifacts,
        board='public_models = ["net-a"], feedback = "aggregate", round_to = 2, reveal = "manual"',
    )
    write_spec(settings.assignments_dir, text)
    alice, bob, ta = accounts["alice"], accounts["bob"], accounts["ta"]
    a_id = add_scored(db, alice, net_a=0.104, net_b=0.9, minutes_ago=10)  # public .104, all .502
    add_scored(db, bob, net_a=0.3, net_b=0.3, minutes_ago=9)  # public .3, all .3
    with TestClient(create_app(settings)) as client:
        public = board(client, alice).json()
        assert public["board"] == "public" and not public["revealed"]
        assert "net-a" in public["selection"]
        assert [(e["rank"], e["is_you"], e["score"]) for e in public["entries"]] == [
            (1, True, 0.1),
            (2, False, 0.3),
        ]
        assert board(client, alice, "private").status_code == 403
        mine = client.get(f"/api/v1/submissions/{a_id}", headers=alice.headers).json()
        assert mine["score"] == 0.5 and "models" not in mine["results"]
        assert mine["results"]["score"] == 0.5  # rounded inside the results too
        assert "aggregate" in mine["results"]["feedback"]
        staff_view = client.get(f"/api/v1/submissions/{a_id}", headers=ta.headers).json()
        assert (
            staff_view["score"] == pytest.approx(0.502)
            and len(staff_view["results"]["models"]) == 2
        )
        private = board(client, ta, "private").json()
        assert [e["username"] for e in private["entries"]] == ["bob", "alice"]

        refused = client.post(f"{BASE}/reveal", headers=alice.headers, json={"reason": "x"})
        assert refused.status_code == 403
        revealed = client.post(f"{BASE}/reveal", headers=ta.headers, json={"reason": "grades out"})
        assert revealed.status_code == 204
        final = board(client, alice).json()
        assert final["board"] == "private" and final["revealed"]
        assert [(e["pseudonym"] != "", e["is_you"], e["score"]) for e in final["entries"]] == [
            (True, False, 0.3),
            (True, True, pytest.approx(0.502)),
        ]
        opened = client.get(f"/api/v1/submissions/{a_id}", headers=alice.headers).json()
        assert len(opened["results"]["models"]) == 2
        assert (
            client.get("/api/v1/audit", headers=ta.headers).json()["data"][0]["action"] == "reveal"
        )


def test_private_board_opens_when_the_last_extension_ends(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    due = utcnow() - timedelta(minutes=5)
    write_spec(
        settings.assignments_dir, spec(artifacts, opens_at=due - timedelta(days=2), due_at=due)
    )
    add_scored(db, accounts["alice"], 0.2, 0.2, minutes_ago=60)
    ta = accounts["ta"]
    with TestClient(create_app(settings)) as client:
        assert board(client, accounts["bob"]).json()["revealed"] is True
        client.put(
            f"{BASE}/extensions/bob",
            headers=ta.headers,
            json={"due_at": (utcnow() + timedelta(hours=1)).isoformat(), "reason": "ill"},
        ).raise_for_status()
        assert board(client, accounts["bob"]).json()["revealed"] is False
        client.delete(f"{BASE}/extensions/bob?reason=recovered", headers=ta.headers)
        assert board(client, accounts["bob"]).json()["revealed"] is True


@pytest.mark.parametrize(
    ("selection", "expected"),
    [("best", "early_best"), ("last", "latest"), ("marked", "early_best")],
)
def test_final_selection_rules_and_ties_going_to_the_earlier_submission(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db, selection, expected
) -> None:
    write_spec(settings.assignments_dir, spec(artifacts, board=f'selection = "{selection}"'))
    alice = accounts["alice"]
    ids = {
        "early_best": add_scored(db, alice, 0.1, 0.1, minutes_ago=30),
        "tie": add_scored(db, alice, 0.1, 0.1, minutes_ago=20),
        "latest": add_scored(db, alice, 0.5, 0.5, minutes_ago=10),
    }
    with TestClient(create_app(settings)) as client:
        (entry,) = board(client, accounts["ta"], "private").json()["entries"]
        assert entry["submission_id"] == ids[expected]  # marked with none marked: best public


def test_marking_up_to_k_and_the_best_marked_counts(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    write_spec(
        settings.assignments_dir, spec(artifacts, board='selection = "marked", max_marked = 2')
    )
    alice, bob = accounts["alice"], accounts["bob"]
    best = add_scored(db, alice, 0.05, 0.05, minutes_ago=40)
    middle = add_scored(db, alice, 0.3, 0.3, minutes_ago=30)
    worst = add_scored(db, alice, 0.6, 0.6, minutes_ago=20)
    failed = add_scored(db, alice, 0.0, 0.0, minutes_ago=10, status=SubmissionStatus.FAILED)
    with TestClient(create_app(settings)) as client:

        def mark(sid: str, method: str = "PUT", who: Account = alice):
            return client.request(method, f"/api/v1/submissions/{sid}/mark", headers=who.headers)

        first = mark(middle)
        assert first.status_code == 200 and first.json()["marked_at"] is not None
        assert mark(worst).status_code == 200
        third = mark(best)
        assert third.status_code == 409 and "unmark one first" in third.json()["error"]["message"]
        assert mark(failed).status_code == 409
        assert mark(middle, who=bob).status_code == 404
        (entry,) = board(client, accounts["ta"], "private").json()["entries"]
        assert entry["submission_id"] == middle  # the best of the two marked
        assert mark(middle, "DELETE").status_code == 200
        assert mark(best).status_code == 200
        (entry,) = board(client, accounts["ta"], "private").json()["entries"]
        assert entry["submission_id"] == best


def test_grades_export_points_between_baselines_and_unscored_students_last(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    write_spec(
        settings.assignments_dir,
        spec(artifacts, grading="points = 10, zero_at = 0.6, full_at = 0.2"),
    )
    add_scored(db, accounts["alice"], 0.4, 0.4, minutes_ago=20)  # halfway: 5 points
    add_scored(db, accounts["bob"], 0.0, 0.0, minutes_ago=15, status=SubmissionStatus.FAILED)
    with TestClient(create_app(settings)) as client:
        ta = accounts["ta"]
        assert (
            client.get(f"{BASE}/grades.csv", headers=accounts["alice"].headers).status_code == 403
        )
        text = client.get(f"{BASE}/grades.csv", headers=ta.headers).text
        rows = {row["student_id"]: row for row in csv.DictReader(io.StringIO(text))}
        assert set(rows) == {"alice", "bob"}  # every student, staff excluded
        assert (rows["alice"]["rank"], rows["alice"]["points"]) == ("1", "5")
        assert float(rows["alice"]["final_score"]) == pytest.approx(0.4)
        assert (rows["bob"]["rank"], rows["bob"]["points"], rows["bob"]["final_score"]) == (
            "",
            "0",
            "",
        )
        assert rows["alice"]["max_points"] == "10"
        private = board(client, ta, "private").json()["entries"]
        assert [(e["username"], e["rank"]) for e in private] == [("alice", 1), ("bob", None)]
        total = client.get(f"/api/v1/assignments/{SLUG}/grades.csv", headers=ta.headers).text
        totals = {row["student_id"]: row for row in csv.DictReader(io.StringIO(total))}
        assert totals["alice"][f"{PHASE}_points"] == "5"
        assert totals["alice"]["total_points"] == "5" and totals["alice"]["max_points"] == "10"


@pytest.mark.parametrize(
    ("score", "points"), [(0.9, 0.0), (0.6, 0.0), (0.4, 5.0), (0.2, 10.0), (0.05, 10.0)]
)
def test_points_are_linear_between_the_baselines_and_clamped(
    artifacts: Artifacts, tmp_path: Path, score: float, points: float
) -> None:
    write_spec(tmp_path, spec(artifacts, grading="points = 10, zero_at = 0.6, full_at = 0.2"))
    grading = load_assignment(tmp_path / "course").phases[0].grading
    assert grading is not None and grading.points_for(score) == pytest.approx(points)


@pytest.mark.parametrize(
    ("board_line", "grading", "message"),
    [
        ('public_models = ["net-z"]', "", "unknown: net-z"),
        ("public_fraction = 0.5", "", "belongs to defense phases"),
        ("", "zero_at = 0.2, full_at = 0.6", "must be lower than zero_at"),
    ],
)
def test_board_and_grading_mistakes_in_the_spec_are_named(
    artifacts: Artifacts, tmp_path: Path, board_line: str, grading: str, message: str
) -> None:
    write_spec(tmp_path, spec(artifacts, board=board_line, grading=grading))
    with pytest.raises(SpecError, match=message):
        load_assignment(tmp_path / "course")


def test_defense_public_points_are_a_fixed_subset(artifacts: Artifacts, tmp_path: Path) -> None:
    write_spec(tmp_path, spec_toml(artifacts, defense=""))
    assignment = load_assignment(tmp_path / "course")
    defense = assignment.phases[1]
    board = defense.leaderboard.model_copy(update={"public_fraction": 0.3})
    phase = defense.model_copy(update={"leaderboard": board})
    first = public_points(assignment, phase, 200)
    assert first == public_points(assignment, phase, 200) and len(first) == 60
    assert len(set(first)) == 60 and all(0 <= i < 200 for i in first)
    assert public_points(assignment, defense, 5) == [0, 1, 2, 3, 4]  # no fraction: every point
    broken_by = [None if i % 2 else "apgd-ce" for i in range(200)]
    row = Submission(
        score=0.5,
        results={
            "leaderboard_suite": "quick",
            "suites": {"quick": {"broken_by": broken_by}},
            "final_robust_accuracy": 0.45,
        },
    )
    expected = sum(i % 2 for i in first) / len(first)
    assert public_score(assignment, phase, row) == pytest.approx(expected)
    assert private_score(phase, row) == 0.45  # the final suite on every point


def test_the_selection_cannot_change_after_the_deadline(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    due = utcnow() - timedelta(minutes=1)
    write_spec(
        settings.assignments_dir,
        spec(
            artifacts,
            board='selection = "marked"',
            opens_at=due - timedelta(days=1),
            due_at=due,
        ),
    )
    alice = accounts["alice"]
    marked = add_scored(db, alice, 0.5, 0.5, minutes_ago=30, marked_at=due - timedelta(hours=1))
    other = add_scored(db, alice, 0.1, 0.1, minutes_ago=20)
    with TestClient(create_app(settings)) as client:
        for method, sid in (("DELETE", marked), ("PUT", other)):
            response = client.request(
                method, f"/api/v1/submissions/{sid}/mark", headers=alice.headers
            )
            assert (
                response.status_code == 403 and response.json()["error"]["code"] == "phase_closed"
            )
        (entry,) = board(client, alice).json()["entries"]
        assert entry["submission_id"] == marked  # the marked one counts, not the better one


def test_exports_do_not_hand_a_spreadsheet_a_formula(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db
) -> None:
    write_spec(settings.assignments_dir, spec(artifacts))
    with db() as session:  # `autograder user add` takes any name; the roster would refuse it
        user = session.get(User, accounts["alice"].user_id)
        user.full_name, user.email = '=HYPERLINK("http://x")', "@evil"
        session.commit()
    add_scored(db, accounts["alice"], 0.2, 0.2, minutes_ago=5)
    with TestClient(create_app(settings)) as client:
        text = client.get(f"{BASE}/grades.csv", headers=accounts["ta"].headers).text
    row = next(r for r in csv.DictReader(io.StringIO(text)) if r["student_id"] == "alice")
    assert row["name"] == '\'=HYPERLINK("http://x")' and row["email"] == "'@evil"


@pytest.mark.parametrize("public_models", [False, True])
def test_a_board_view_costs_the_same_queries_however_many_submissions(
    accounts: dict[str, Account], artifacts: Artifacts, settings, db, public_models: bool
) -> None:
    # Boards are looked at all through a deadline: one query per submission (a lazy user, a
    # results column decoded on use) would make every view cost more than the uploads.
    board_spec = 'public_models = ["net-a"]' if public_models else ""
    write_spec(settings.assignments_dir, spec(artifacts, board=board_spec))
    statements: list[str] = []
    engine = db.kw["bind"]

    def count(_conn, _cursor, statement: str, *_: object) -> None:
        statements.append(statement)

    def queries_for_a_view(client: TestClient) -> int:
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            response = board(client, accounts["ta"])
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert response.status_code == 200
        return len(statements)

    with TestClient(create_app(settings)) as client:
        add_scored(db, accounts["alice"], net_a=0.5, net_b=0.5, minutes_ago=100)
        few = queries_for_a_view(client)
        for minute in range(40):
            who = accounts["alice"] if minute % 2 else accounts["bob"]
            add_scored(db, who, net_a=minute / 40, net_b=0.2, minutes_ago=minute)
        many = queries_for_a_view(client)
        entries = board(client, accounts["ta"]).json()["entries"]
    assert many == few <= 8
    assert [(e["rank"], e["submissions"]) for e in entries] in (
        [(1, 21), (2, 20)],
        [(1, 20), (2, 21)],
    )
