"""Assignment specs: validation errors name the file, field and reason; times become UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from server import cli
from server.assignments import SpecError, TimeLimits, load_assignment, load_assignments
from server.config import Settings, get_settings
from server.main import create_app
from tests.conftest import Artifacts, spec_toml, write_spec

ATTACK_LIMITS = "max_upload_mb = 1 }"
"""The end of the attack phase's inline `limits` table in the test spec."""
DEFENSE_LIMITS = "max_total = 20 }"
"""The end of the defense phase's inline `limits` table in the test spec."""


def test_valid_spec_loads_with_local_times_converted_to_utc(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    text = spec_toml(artifacts).replace("opens_at = ", "opens_at = 2026-09-01T09:00:00\n#", 1)
    write_spec(tmp_path, text)
    spec = load_assignment(tmp_path / "course")
    phase = spec.phases[0]
    assert phase.opens_at == datetime(2026, 9, 1, 13, 0, tzinfo=UTC)  # 09:00 EDT
    assert phase.hidden_models[1].preprocessing is not None
    assert spec.folder == (tmp_path / "course").resolve()


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (("eps = 8", "eps = -1"), "phases.0.threat_model.eps", "greater than 0"),
        (('norm = "linf"', 'norm = "l7"'), "phases.0.threat_model.norm", "linf"),
        (('track = "attack"', 'track = "quiz"'), "phases.0.track", "attack"),
        (('timezone = "America/New_York"', 'timezone = "Mars/Olympus"'), "timezone", "IANA"),
        (
            ('architecture = "resnet20"', 'architecture = "resnet9000"'),
            "phases.0.hidden_models.0.architecture",
            "resnet20",
        ),
        (
            ("quality = 75", "quality = 0"),
            "phases.0.hidden_models.1.preprocessing.quality",
            "greater than or equal to 1",
        ),
        (('file = "eval.npz"', 'file = "../etc/passwd"'), "phases.0.evaluation_set.file", ".."),
    ],
)
def test_invalid_field_is_reported_with_file_field_and_reason(
    tmp_path: Path, artifacts: Artifacts, change: tuple[str, str], field: str, reason: str
) -> None:
    text = spec_toml(artifacts)
    assert change[0] in text
    path = write_spec(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(SpecError) as error:
        load_assignment(path.parent)
    message = str(error.value)
    assert str(path) in message and field in message and reason in message


def test_due_before_open_and_duplicate_models_are_rejected(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    early = datetime(2026, 1, 1, tzinfo=UTC)
    path = write_spec(tmp_path, spec_toml(artifacts, opens_at=early, due_at=early))
    with pytest.raises(SpecError, match="due_at must be after opens_at"):
        load_assignment(path.parent)
    path = write_spec(tmp_path, spec_toml(artifacts).replace('"net-b"', '"net-a"'))
    with pytest.raises(SpecError, match="unique"):
        load_assignment(path.parent)


def test_yaml_spec_and_broken_toml(tmp_path: Path, artifacts: Artifacts) -> None:
    folder = tmp_path / "yaml-course"
    folder.mkdir()
    (folder / "assignment.yaml").write_text(
        f"""
title: YAML course
phases:
  - id: attack
    title: Attack
    track: attack
    opens_at: 2026-01-01T00:00:00Z
    due_at: 2026-02-01T00:00:00Z
    evaluation_set: {{file: eval.npz, sha256: "{artifacts.eval_sha}"}}
    hidden_models:
      - name: net-a
        architecture: resnet20
        weights: {{file: net-a.safetensors, sha256: "{artifacts.weights["net-a"]}"}}
"""
    )
    specs = load_assignments(tmp_path, visibility_timeout_s=21600)
    assert specs["yaml-course"].phases[0].threat_model.eps == 8
    broken = write_spec(tmp_path, "title = \n")
    with pytest.raises(SpecError, match=r"assignment\.toml: not valid TOML"):
        load_assignment(broken.parent)


def test_shipped_example_spec_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "assignments" / "examples"
    folders = [p for p in example.iterdir() if p.is_dir()]
    assert folders, "assignments/examples must hold at least one example"
    for folder in folders:
        assert load_assignment(folder).phases


def test_defense_phase_loads_with_its_evaluation_config(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    text = spec_toml(artifacts, defense="seed = 7")
    write_spec(tmp_path, text.replace('final_suite = "full"', 'final_suite = "quick"'))
    spec = load_assignment(tmp_path / "course")
    defense = spec.phases[1]
    assert defense.scoring_metric.value == "robust_accuracy"
    assert defense.scoring_metric.higher_is_better
    assert defense.defense is not None
    assert defense.defense.seed == 7 and defense.defense.suites() == ["quick"]
    assert defense.defense.params.square_queries == 10
    assert spec.phases[0].scoring_metric.value == "mean_accuracy"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (('["resnet20"]', '["resnet9000"]'), "allowed_architectures", "resnet20"),
        (('["resnet20"]', "[]"), "allowed_architectures", "at least 1"),
        (('transfer_from = ["attack"]', 'transfer_from = ["defense"]'), "", "not an attack"),
        (
            ('leaderboard_suite = "quick"', 'leaderboard_suite = "fast"'),
            "leaderboard_suite",
            "full",
        ),
        (("square_queries = 10", "square_queries = 0"), "square_queries", "greater than"),
        (("square_queries = 10", "sqare_queries = 10"), "sqare_queries", "Extra inputs"),
    ],
)
def test_invalid_defense_phase_is_reported_with_field_and_reason(
    tmp_path: Path, artifacts: Artifacts, change: tuple[str, str], field: str, reason: str
) -> None:
    text = spec_toml(artifacts, defense="")
    assert change[0] in text
    path = write_spec(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(SpecError) as error:
        load_assignment(path.parent)
    message = str(error.value)
    assert str(path) in message and field in message and reason in message


def test_defense_phase_without_its_table_is_rejected(tmp_path: Path, artifacts: Artifacts) -> None:
    text = spec_toml(artifacts, defense="").split("[phases.defense]")[0]
    with pytest.raises(SpecError, match=r"phases\.1: .*needs a \[phases\.defense\] table"):
        load_assignment(write_spec(tmp_path, text).parent)


def test_attack_phase_with_a_defense_table_is_rejected(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    text = spec_toml(artifacts).replace(
        "[[phases.hidden_models]]",
        '[phases.defense]\nallowed_architectures = ["resnet20"]\n[[phases.hidden_models]]',
        1,
    )
    with pytest.raises(SpecError, match="defense phases only"):
        load_assignment(write_spec(tmp_path, text).parent)


def test_time_limits_default_by_track(tmp_path: Path, artifacts: Artifacts) -> None:
    spec = load_assignment(write_spec(tmp_path, spec_toml(artifacts, defense="")).parent)
    attack, defense = spec.phases
    assert attack.time_limits == TimeLimits(soft_s=300, hard_s=360)
    assert defense.time_limits == TimeLimits(soft_s=3 * 3600, hard_s=3 * 3600 + 10 * 60)
    assert (attack.limits.soft_time_limit_s, attack.limits.time_limit_s) == (300, 360)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("soft_time_limit_s = 600", TimeLimits(soft_s=600, hard_s=660)),  # default 60 s gap
        ("time_limit_s = 90", TimeLimits(soft_s=30, hard_s=90)),
        ("soft_time_limit_s = 10, time_limit_s = 20", TimeLimits(soft_s=10, hard_s=20)),
    ],
)
def test_time_limits_set_in_the_spec(
    tmp_path: Path, artifacts: Artifacts, extra: str, expected: TimeLimits
) -> None:
    text = spec_toml(artifacts).replace(ATTACK_LIMITS, f"max_upload_mb = 1, {extra} }}")
    assert load_assignment(write_spec(tmp_path, text).parent).phases[0].time_limits == expected


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("soft_time_limit_s = 400, time_limit_s = 360", "soft_time_limit_s (400 s) must be below"),
        ("soft_time_limit_s = 360, time_limit_s = 360", "must be below time_limit_s (360 s)"),
        ("time_limit_s = 45", "set soft_time_limit_s too"),
        ("soft_time_limit_s = 0", "greater than 0"),
    ],
)
def test_inconsistent_time_limits_are_rejected(
    tmp_path: Path, artifacts: Artifacts, extra: str, reason: str
) -> None:
    text = spec_toml(artifacts).replace(ATTACK_LIMITS, f"max_upload_mb = 1, {extra} }}")
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as error:
        load_assignment(path.parent)
    message = str(error.value)
    assert str(path) in message and "phases.0" in message and reason in message


def test_hard_limit_must_stay_below_the_visibility_timeout(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    text = spec_toml(artifacts, defense="").replace(
        DEFENSE_LIMITS, "max_total = 20, soft_time_limit_s = 20000, time_limit_s = 21600 }"
    )
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as error:
        load_assignments(tmp_path, visibility_timeout_s=21600)
    message = str(error.value)
    assert str(path) in message and "phases.1.limits.time_limit_s" in message
    assert "'defense'" in message and "AUTOGRADER_VISIBILITY_TIMEOUT_S" in message
    assert load_assignments(tmp_path, visibility_timeout_s=21601)["course"].phases[1].time_limits


def test_the_catalog_and_the_check_command_refuse_a_limit_past_the_visibility_timeout(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    short = settings.model_copy(update={"visibility_timeout_s": 360.0})  # attack hard limit: 360
    with pytest.raises(SpecError, match="phase 'attack' may run 360 s"):
        create_app(short)
    assert create_app(settings.model_copy(update={"visibility_timeout_s": 361.0}))
    monkeypatch.setenv("AUTOGRADER_VISIBILITY_TIMEOUT_S", "360")
    get_settings.cache_clear()
    try:
        assert cli.main(["assignments", "check", str(settings.assignments_dir)]) == 1
        assert "phases.0.limits.time_limit_s" in capsys.readouterr().err
        monkeypatch.setenv("AUTOGRADER_VISIBILITY_TIMEOUT_S", "361")
        get_settings.cache_clear()
        assert cli.main(["assignments", "check", str(settings.assignments_dir)]) == 0
    finally:
        get_settings.cache_clear()


def test_scoring_key_follows_what_decides_a_score_and_nothing_else(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    def key(text: str) -> str:
        write_spec(tmp_path, text)
        return load_assignment(tmp_path / "course").phases[0].scoring_key

    base = spec_toml(artifacts)
    same = key(base)
    assert key(base.replace('title = "Attack"', 'title = "Renamed"')) == same
    assert key(base.replace("max_upload_mb = 1", "max_upload_mb = 2")) == same
    assert key(base.replace("eps = 8", "eps = 4")) != same
    assert key(base.replace("quality = 75", "quality = 60")) != same
    assert key(base.replace(artifacts.weights["net-a"], "f" * 64)) != same
