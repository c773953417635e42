"""Hostile assignment specs: the loader refuses them with a SpecError naming the file (and the
field or line where there is one), without running code or expanding them."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.assignments import MAX_SPEC_BYTES, SpecError, load_assignment
from tests.conftest import Artifacts


def billion_laughs(levels: int = 9) -> str:
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        refs = ", ".join([f"*lol{level - 1}"] * 9)
        lines.append(f"lol{level}: &lol{level} [{refs}]")
    return "\n".join(lines) + f"\ntitle: *lol{levels - 1}\nphases: [*lol{levels - 1}]\n"


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    folder = tmp_path / "course"
    folder.mkdir()
    (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        pytest.param("assignment.yaml", billion_laughs().encode(), "billion laughs", id="laughs"),
        pytest.param("assignment.yaml", b"title: &t [*t]\n", "refers to the value", id="cycle"),
        pytest.param(
            "assignment.yaml",
            b"title: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
            "python/object/apply:builtins.open",
            id="python-object-apply",
        ),
        pytest.param(
            "assignment.yaml",
            b"title: !!python/name:os.system\n",
            "python/name:os.system",
            id="python-name",
        ),
        pytest.param(
            "assignment.yaml",
            b"title: x\nphases:\n  - !!python/object:pathlib.Path {}\n",
            "line 3",
            id="python-object-in-a-list",
        ),
        pytest.param(
            "assignment.yaml", b"title: " + b"[" * 5000 + b"]" * 5000, "nested", id="deep-yaml"
        ),
        pytest.param(
            "assignment.toml", b"title = " + b"[" * 5000 + b"]" * 5000, "nested", id="deep-toml"
        ),
        pytest.param(
            "assignment.toml",
            b"t = " + b"{a=" * 3000 + b"1" + b"}" * 3000,
            "nested",
            id="deep-table",
        ),
        pytest.param("assignment.toml", b"\xff\xfe\x00t\x00i", "not UTF-8", id="utf16-binary"),
        pytest.param("assignment.yaml", b"title: a\x00b\n", "not valid YAML", id="nul-yaml"),
        pytest.param(
            "assignment.toml",
            b'title = "x"\n' + b"#" * MAX_SPEC_BYTES,
            "over 1 MiB",
            id="over-1-mib",
        ),
    ],
)
def test_hostile_spec_is_refused_naming_the_file(
    tmp_path: Path, name: str, content: bytes, says: str
) -> None:
    marker = tmp_path / "pwned"
    folder = write(tmp_path, name, content.replace(b"{marker}", str(marker).encode()))
    with pytest.raises(SpecError) as error:
        load_assignment(folder)
    message = str(error.value)
    assert str(folder / name) in message and says in message
    assert not marker.exists()


def test_yaml_anchors_for_shared_blocks_still_load(tmp_path: Path, artifacts: Artifacts) -> None:
    weights = f'{{file: net-a.safetensors, sha256: "{artifacts.weights["net-a"]}"}}'
    folder = write(
        tmp_path,
        "assignment.yaml",
        f"""
title: Shared blocks
phases:
  - id: one
    title: One
    track: attack
    opens_at: 2026-01-01T00:00:00Z
    due_at: 2026-02-01T00:00:00Z
    evaluation_set: &eval {{file: eval.npz, sha256: "{artifacts.eval_sha}"}}
    hidden_models: [&model {{name: net-a, architecture: resnet20, weights: {weights}}}]
  - id: two
    title: Two
    track: attack
    opens_at: 2026-02-01T00:00:00Z
    due_at: 2026-03-01T00:00:00Z
    evaluation_set: *eval
    hidden_models: [*model]
""".encode(),
    )
    spec = load_assignment(folder)
    assert [p.hidden_models[0].name for p in spec.phases] == ["net-a", "net-a"]
