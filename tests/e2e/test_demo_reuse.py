"""`autograder demo --build-only` twice in one home: the second run reuses the first's course."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.servers import build_demo, clean_environment, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def artifacts(home: Path) -> dict[Path, tuple[int, int]]:
    """Every built file (data, spec, database) with its size and modification time."""
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in (home / "data", home / "assignments")
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.timeout(300)
def test_second_demo_build_reuses_the_course_and_keeps_the_tokens(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = clean_environment({"AUTOGRADER_PORT": str(free_port())})

    first = build_demo(home, env)
    assert "reusing" not in first.stdout, first.stdout
    credentials = (home / "demo-credentials.json").read_bytes()
    built = artifacts(home)
    assert any(p.suffix == ".safetensors" for p in built), sorted(built)

    second = build_demo(home, env)  # fails the test on a non-zero exit
    assert "reusing" in second.stdout, second.stdout
    assert (home / "demo-credentials.json").read_bytes() == credentials
    assert artifacts(home) == built, "the second run rebuilt artifacts it should have reused"
