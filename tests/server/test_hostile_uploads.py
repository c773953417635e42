"""Hostile uploads through the real REST endpoints: every bad file gets a 4xx naming the problem,
and nothing runs, nothing is stored, nothing is charged and nothing reaches the broker."""

from __future__ import annotations

import csv
import io
import pickle
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from graders.architectures import Architecture, build_model
from server.config import Settings
from server.db import session_factory_for
from server.main import create_app
from server.models import AuditEvent, Invitation, Submission, User
from server.services.accounts import MAX_ROSTER_BYTES, STUDENT_ID, InvalidRoster, parse_roster
from tests import hostile_files as hf
from tests.conftest import DEFENSE_PHASE, PHASE, SLUG, Account, Artifacts, spec_toml, write_spec

ATTACK_URL = f"/api/v1/assignments/{SLUG}/phases/{PHASE}"
DEFENSE_URL = f"/api/v1/assignments/{SLUG}/phases/{DEFENSE_PHASE}"
CIFAR = {"architecture": "resnet20", "normalization": "cifar10"}
MIB = 1024 * 1024


@pytest.fixture
def client(settings: Settings, db, artifacts: Artifacts) -> Iterator[TestClient]:
    """The tiny course with both an attack and a defense phase."""
    write_spec(settings.assignments_dir, spec_toml(artifacts, defense=""))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def target(artifacts: Artifacts, tmp_path: Path) -> hf.Target:
    return hf.Target(list(artifacts.eval_set.names), artifacts.eval_set.images, tmp_path / "pwned")


@cache
def resnet20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(Architecture.RESNET20).net.state_dict()


# --- What "nothing happened" means -------------------------------------------------------------


def broker_messages(settings: Settings) -> int:
    """Messages in the embedded broker's SQLite file (none if it was never created)."""
    path = Path(settings.broker_url.removeprefix("sqla+sqlite:///"))
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "kombu_message" not in tables:
            return 0
        return int(conn.execute("SELECT count(*) FROM kombu_message").fetchone()[0])


def stored_files(settings: Settings) -> list[Path]:
    return [p for p in settings.upload_path.rglob("*") if p.is_file()]


def count(settings: Settings, model: type) -> int:
    with session_factory_for(settings.db_url)() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def assert_refused(response, status: int, code: str, says: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert says in error["message"], error["message"]


def assert_nothing_happened(client: TestClient, settings: Settings, account: Account) -> None:
    assert count(settings, Submission) == 0
    assert stored_files(settings) == []  # the incoming folder included
    assert broker_messages(settings) == 0
    for url in (ATTACK_URL, DEFENSE_URL):
        quota = client.get(f"{url}/quota", headers=account.headers).json()
        assert (quota["used_today"], quota["used_total"]) == (0, 0)


def test_the_checks_see_an_accepted_upload(
    client: TestClient, accounts: dict[str, Account], settings: Settings, target: hf.Target
) -> None:
    """The harness can fail: a valid upload leaves a row, files, a broker message and a charge."""
    response = client.post(
        f"{ATTACK_URL}/submissions",
        headers=accounts["alice"].headers,
        files={"file": ("adv.npy", hf.valid_npy(target))},
    )
    assert response.status_code == 202, response.text
    assert count(settings, Submission) == 1 and stored_files(settings)
    assert broker_messages(settings) == 1
    quota = client.get(f"{ATTACK_URL}/quota", headers=accounts["alice"].headers).json()
    assert quota["used_total"] == 1


# --- Attack batches ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[hf.Target], bytes]
    name: str
    status: int
    code: str
    says: str
    content_type: str | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def param(self) -> object:
        return pytest.param(self, id=self.id)


def zip_case(case_id: str, build: object, code: str, says: str, status: int = 422) -> object:
    return Case(case_id, build, "adv.zip", status, code, says).param()  # type: ignore[arg-type]


ATTACK_CASES = [
    # Pickles that would run code if loaded.
    Case("npy-object-array", hf.object_npy, "adv.npy", 422, "object_array", "never loaded").param(),
    Case("npz-object-array", hf.object_npz, "adv.npz", 422, "object_array", "never loaded").param(),
    Case(
        "npz-object-array-beside-images",
        hf.npz_with_pickle_and_images,
        "adv.npz",
        422,
        "object_array",
        "never loaded",
    ).param(),
    Case(
        "raw-pickle-as-npy", hf.raw_pickle, "adv.npy", 415, "unsupported_format", "pickle"
    ).param(),
    Case("torch-save-as-pt", hf.torch_pickle, "adv.pt", 415, "unsupported_format", "zip").param(),
    Case(
        "torch-save-as-zip", hf.torch_pickle, "adv.zip", 422, "unexpected_files", "data.pkl"
    ).param(),
    Case(
        "torch-save-as-npz", hf.torch_pickle, "adv.npz", 415, "unsupported_format", "not .npy"
    ).param(),
    zip_case("zip-pickle-named-png", hf.zip_with_pickle_as_png, "not_a_png", "PNG signature"),
    zip_case("zip-with-pickle-file", hf.zip_with_pickle_file, "unexpected_files", "payload.pkl"),
    # Zip bombs and archive tricks.
    zip_case("zip-declares-1gib", hf.zip_declaring_1gib, "archive_too_large", "expands to"),
    zip_case("zip-bomb-64mib", hf.zip_bomb_honest, "archive_too_large", "expands to"),
    zip_case("zip-bomb-lying-header", hf.zip_bomb_lying, "corrupt_archive", "cannot be read"),
    zip_case("zip-5000-entries", hf.zip_many_entries, "too_many_entries", "5020 entries"),
    zip_case("zip-300-folders-deep", hf.zip_deeply_nested, "unexpected_files", "d/d/d/"),
    zip_case("zip-of-zips", hf.zip_of_zips, "nested_archive", "batch.zip"),
    zip_case("zip-dotdot", hf.zip_entry_named("../"), "unsafe_entry_name", "'..'"),
    zip_case("zip-dotdot-inside", hf.zip_entry_named("a/../../"), "unsafe_entry_name", "'..'"),
    zip_case("zip-absolute", hf.zip_entry_named("/tmp/"), "unsafe_entry_name", "absolute"),
    zip_case("zip-drive-letter", hf.zip_entry_named("C:/"), "unsafe_entry_name", "drive"),
    zip_case("zip-backslash", hf.zip_entry_named("..\\"), "unsafe_entry_name", "backslash"),
    zip_case("zip-symlink", hf.zip_with_symlink, "symlink_entry", "symbolic links"),
    # Images.
    zip_case("png-20000x20000", hf.zip_with_png_bomb, "wrong_image_size", "20000 x 20000"),
    zip_case("png-truncated", hf.zip_with_truncated_png, "corrupt_png", "truncated"),
    # Truncated and polyglot files.
    zip_case("zip-truncated", hf.truncated_zip, "corrupt_archive", "cannot be read"),
    Case("npy-truncated", hf.truncated_npy, "adv.npy", 422, "corrupt_array", "np.load").param(),
    Case(
        "png-with-zip-appended",
        hf.png_with_zip_appended,
        "adv.zip",
        415,
        "unsupported_format",
        "a single PNG image",
    ).param(),
    Case("png-renamed-npy", hf.png_renamed, "adv.npy", 415, "unsupported_format", "PNG").param(),
    Case("npy-renamed-zip", hf.valid_npy, "adv.zip", 415, "unsupported_format", "np.save").param(),
    # Arrays of the wrong kind.
    Case(
        "float64-0-255", hf.floats_out_of_range, "adv.npy", 422, "values_out_of_range", "[0, 1]"
    ).param(),
    Case("int64", hf.as_dtype(np.int64), "adv.npy", 422, "wrong_dtype", "int64").param(),
    Case("bool", hf.as_dtype(np.bool_), "adv.npy", 422, "wrong_dtype", "bool").param(),
    Case("complex", hf.as_dtype(np.complex64), "adv.npy", 422, "wrong_dtype", "complex").param(),
    Case("shape-n-32-32", hf.wrong_shape, "adv.npy", 422, "wrong_shape", "(20, 32, 32)").param(),
    Case("one-image-too-many", hf.wrong_count, "adv.npy", 422, "wrong_count", "21 images").param(),
    Case("float-hwc", hf.hwc_floats, "adv.npy", 422, "wrong_layout", "CHW").param(),
    Case("nan", hf.with_value(float("nan")), "adv.npy", 422, "non_finite_values", "1 NaN").param(),
    Case(
        "inf", hf.with_value(float("inf")), "adv.npy", 422, "non_finite_values", "1 infinite"
    ).param(),
    # Empty, too large, wrong names and content types.
    Case("empty-npy", lambda t: b"", "adv.npy", 400, "empty_file", "empty").param(),
    Case("empty-zip", lambda t: b"", "adv.zip", 400, "empty_file", "empty").param(),
    Case(
        "over-the-cap",
        lambda t: b"\x93NUMPY" + bytes(MIB + 1),
        "adv.npy",
        413,
        "file_too_large",
        "1.0 MiB",
    ).param(),
    Case("npy-named-exe", hf.valid_npy, "adv.npy.exe", 415, "unsupported_format", ".exe").param(),
    Case("no-extension", hf.valid_npy, "adv", 415, "unsupported_format", "no extension").param(),
    Case(
        "pickle-sent-as-image-png",
        hf.object_npy,
        "adv.npy",
        422,
        "object_array",
        "never loaded",
        content_type="image/png",
    ).param(),
    Case(
        "csv-sent-as-batch",
        lambda t: b"student_id,name,email\n",
        "adv.csv",
        415,
        "unsupported_format",
        "unknown format",
        content_type="text/csv",
    ).param(),
    Case(
        "defense-fields-on-attack-phase",
        hf.valid_npy,
        "adv.npy",
        422,
        "unexpected_fields",
        "attack phase",
        fields=CIFAR,
    ).param(),
]


@pytest.mark.parametrize("case", ATTACK_CASES)
def test_hostile_batch_is_refused_and_leaves_nothing(
    client: TestClient,
    accounts: dict[str, Account],
    settings: Settings,
    target: hf.Target,
    case: Case,
) -> None:
    content = case.build(target)
    upload = (case.name, content, case.content_type) if case.content_type else (case.name, content)
    response = client.post(
        f"{ATTACK_URL}/submissions",
        headers=accounts["alice"].headers,
        files={"file": upload},
        data=case.fields,
    )
    assert_refused(response, case.status, case.code, case.says)
    assert not target.marker.exists()
    assert_nothing_happened(client, settings, accounts["alice"])


@pytest.mark.parametrize(
    "build",
    [hf.object_npy, hf.object_npz, hf.raw_pickle, hf.torch_pickle],
    ids=lambda b: b.__name__,
)
def test_the_pickle_payloads_are_live(tmp_path: Path, target: hf.Target, build) -> None:
    """Loading the corpus's pickles the unsafe way does run code: the refusals above mean it."""
    content = build(target)
    if build is hf.raw_pickle:
        pickle.loads(content)
    elif build is hf.torch_pickle:
        torch.load(io.BytesIO(content), weights_only=False)
    else:
        loaded = np.load(io.BytesIO(content), allow_pickle=True)
        _ = loaded["images"] if hasattr(loaded, "files") else loaded
    assert target.marker.exists()


@pytest.mark.parametrize(
    ("headers", "body", "status", "code", "says"),
    [
        pytest.param(
            {"content-type": "application/octet-stream"},
            {"content": b"\x93NUMPY" + bytes(100)},
            422,
            "invalid_request",
            "file",
            id="raw-body-not-multipart",
        ),
        pytest.param(
            {}, {"data": {"file": "adv.npy"}}, 422, "invalid_request", "file", id="no-file"
        ),
        pytest.param(
            {"content-type": "multipart/form-data; boundary=xyz"},
            {"content": b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a'},
            422,
            "invalid_request",
            "body.file",
            id="truncated-multipart",
        ),
    ],
)
def test_malformed_upload_requests_are_refused(
    client: TestClient,
    accounts: dict[str, Account],
    settings: Settings,
    headers: dict[str, str],
    body: dict[str, object],
    status: int,
    code: str,
    says: str,
) -> None:
    response = client.post(
        f"{ATTACK_URL}/submissions",
        headers={**accounts["alice"].headers, **headers},
        **body,  # type: ignore[arg-type]
    )
    assert_refused(response, status, code, says)
    assert_nothing_happened(client, settings, accounts["alice"])


# --- Defense checkpoints -----------------------------------------------------------------------


def checkpoint(build: Callable[[dict[str, torch.Tensor], hf.Target], bytes]) -> Callable:
    return lambda t: build(dict(resnet20_state()), t)


def _cast(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor], hf.Target], bytes]:
    return lambda s, t: hf.safetensors_bytes({k: v.to(dtype) for k, v in s.items()})


def _with_inf(s: dict[str, torch.Tensor], t: hf.Target) -> bytes:
    bias = s["linear.bias"].clone()
    bias[2] = float("inf")
    return hf.safetensors_bytes(hf.state_with(s, **{"linear.bias": bias}))


def manifest_case(case_id: str, manifest: bytes, says: str) -> object:
    content = checkpoint(lambda s, t: hf.safetensors_bytes(s))
    case = Case(case_id, content, "model.safetensors", 422, "invalid_manifest", says)
    return pytest.param(case, manifest, id=case_id)


def defense_case(
    case_id: str, build: Callable, name: str, says: str, status: int = 422, code: str = ""
) -> object:
    case = Case(case_id, build, name, status, code or "invalid_checkpoint", says, fields=CIFAR)
    return pytest.param(case, None, id=case_id)


DEFENSE_CASES = [
    defense_case("raw-pickle-as-pth", hf.raw_pickle, "model.pth", "not a tensor-only"),
    defense_case("raw-pickle-as-bin", hf.raw_pickle, "model.bin", "not a tensor-only"),
    defense_case("torch-save-payload", hf.torch_pickle, "model.pt", "refusing to unpickle"),
    defense_case(
        "payload-beside-real-weights",
        checkpoint(
            lambda s, t: hf.torch_bytes({"state_dict": s, "epoch": hf.WritesMarker(t.marker)})
        ),
        "model.pt",
        "refusing to unpickle",
    ),
    defense_case("pickle-as-safetensors", hf.raw_pickle, "model.safetensors", "header"),
    defense_case(
        "pt-with-deflated-64mib-storage",
        checkpoint(lambda s, t: hf.torch_zip_with_deflated_storage(s, 64 * MIB)),
        "model.pt",
        "compressed",
    ),
    defense_case(
        "pt-record-declaring-1gib",
        checkpoint(lambda s, t: hf.torch_zip_declaring(s, 1024 * MIB)),
        "model.pt",
        "more than the file's own",
    ),
    defense_case(
        "safetensors-truncated",
        checkpoint(lambda s, t: hf.safetensors_bytes(s)[:-100]),
        "model.safetensors",
        "could not read weights",
    ),
    defense_case(
        "pt-truncated",
        checkpoint(lambda s, t: hf.torch_bytes(s)[: 200 * 1024]),
        "model.pt",
        "could not read weights",
    ),
    defense_case(
        "safetensors-2^60-byte-header",
        lambda t: hf.safetensors_huge_header(),
        "model.safetensors",
        "header too large",
    ),
    defense_case("inf-weight", checkpoint(_with_inf), "model.safetensors", "NaN or infinite"),
    defense_case("int64-weights", checkpoint(_cast(torch.int64)), "model.safetensors", "int64"),
    defense_case("bool-weights", checkpoint(_cast(torch.bool)), "model.safetensors", "bool"),
    defense_case("png-renamed", hf.png_renamed, "model.safetensors", "could not read weights"),
    defense_case("npy-renamed", hf.valid_npy, "model.pt", "could not read weights"),
    defense_case("empty-pt", lambda t: b"", "model.pt", "empty", 400, "empty_file"),
    defense_case("empty-safetensors", lambda t: b"", "m.safetensors", "empty", 400, "empty_file"),
    defense_case(
        "over-the-cap", lambda t: bytes(4 * MIB + 1), "m.pt", "4.0 MiB", 413, "file_too_large"
    ),
    defense_case(
        "onnx",
        lambda t: b"\x08\x07onnx",
        "model.onnx",
        ".safetensors",
        422,
        "unsupported_checkpoint",
    ),
    manifest_case("manifest-nested-4000-deep", b"[" * 4000, "nested"),
    manifest_case("manifest-binary", b"\x80\x04\x95junk\xff", "not valid JSON"),
    manifest_case("manifest-not-an-object", b"[1, 2, 3]", "valid dictionary"),
    manifest_case(
        "manifest-nan-mean",
        b'{"architecture": "resnet20", "mean": [NaN, 0, 0], "std": [1, 1, 1]}',
        "finite",
    ),
    manifest_case(
        "manifest-bool-mean",
        b'{"architecture": "resnet20", "mean": [true, 0, 0], "std": [1, 1, 1]}',
        "mean",
    ),
    manifest_case("manifest-over-4kib", b" " * 5000 + b"{}", "4096 bytes"),
]


@pytest.mark.parametrize(("case", "manifest"), DEFENSE_CASES)
def test_hostile_checkpoint_is_refused_and_leaves_nothing(
    client: TestClient,
    accounts: dict[str, Account],
    settings: Settings,
    target: hf.Target,
    case: Case,
    manifest: bytes | None,
) -> None:
    files = {"file": (case.name, case.build(target))}
    if manifest is not None:
        files["manifest"] = ("manifest.json", manifest)
    response = client.post(
        f"{DEFENSE_URL}/submissions",
        headers=accounts["alice"].headers,
        files=files,
        data=case.fields,
    )
    assert_refused(response, case.status, case.code, case.says)
    assert not target.marker.exists()
    assert_nothing_happened(client, settings, accounts["alice"])


# --- Roster CSVs -------------------------------------------------------------------------------

HEADER = b"student_id,name,email\n"


def roster_case(
    case_id: str, content: bytes, says: str, status: int = 422, code: str = ""
) -> object:
    return pytest.param(content, status, code or "invalid_roster", says, id=case_id)


ROSTER_CASES = [
    roster_case("random-bytes", np.random.default_rng(1).bytes(4096), "not UTF-8"),
    roster_case("zip-file", hf.zipped([("roster.csv", HEADER)]) + bytes([0xFF]), "not UTF-8"),
    roster_case("pickle", pickle.dumps({"student_id": "s1"}), "not UTF-8"),
    roster_case("nul-bytes", bytes(64), "missing: student_id"),
    roster_case("200-kb-field", HEADER + b"s1,Ann " + b"x" * 200_000 + b",a@b.cd\n", "line 2"),
    roster_case("200-kb-header", b"x" * 200_000 + b"\n", "line 1"),
    roster_case(
        "over-1-mib",
        HEADER + b"s1,Ann,a@b.cd\n" * (MAX_ROSTER_BYTES // 14 + 1),
        "1 MiB",
        413,
        "file_too_large",
    ),
    roster_case(
        "hyperlink-formula", HEADER + b's1,"=HYPERLINK(""http://x"",""y"")",a@b.cd\n', "formula"
    ),
    roster_case("plus-formula", HEADER + b"s1,+1+cmd|' /C calc'!A0,a@b.cd\n", "formula"),
    roster_case("minus-formula", HEADER + b"s1,-2+3,a@b.cd\n", "formula"),
    roster_case("at-formula", HEADER + b"s1,@SUM(A1:A9),a@b.cd\n", "formula"),
    roster_case("formula-email", HEADER + b"s1,Ann,=1+2@evil.cd\n", "formula"),
    roster_case("tab-prefixed", HEADER + b"s1,\t=1+2,a@b.cd\n", "formula"),
    roster_case("nul-in-name", HEADER + b"s1,A\x00nn,a@b.cd\n", "control character"),
    roster_case("escape-in-name", HEADER + b"s1,A\x1b[31mnn,a@b.cd\n", "control character"),
    roster_case(
        "bidi-override-in-name", HEADER + "s1,A\u202enn,a@b.cd\n".encode(), "control character"
    ),
]


def roster_untouched(settings: Settings) -> None:
    assert count(settings, User) == 3  # alice, bob and the TA
    assert count(settings, Invitation) == 0 and count(settings, AuditEvent) == 0
    assert stored_files(settings) == [] and broker_messages(settings) == 0


@pytest.mark.parametrize(("content", "status", "code", "says"), ROSTER_CASES)
def test_hostile_roster_is_refused_and_imports_nobody(
    client: TestClient,
    accounts: dict[str, Account],
    settings: Settings,
    content: bytes,
    status: int,
    code: str,
    says: str,
) -> None:
    response = client.post(
        "/api/v1/roster", headers=accounts["ta"].headers, files={"file": ("roster.csv", content)}
    )
    assert_refused(response, status, code, says)
    roster_untouched(settings)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            b"\xef\xbb\xbfstudent_id,name,email\r\ns1,Ann,a@b.cd\r\ns2,Bo,b@b.cd\r\n", id="bom-crlf"
        ),
        pytest.param(b"student_id,name,email\rs1,Ann,a@b.cd\rs2,Bo,b@b.cd\r", id="cr-only"),
        pytest.param(
            b" Student_ID , NAME ,Email\ns1, Ann ,a@b.cd\n\n\ns2,Bo,b@b.cd\n\n",
            id="spacing-blank-lines",
        ),
        pytest.param(
            b'student_id,name,email\ns1,"Ann, Jr.",a@b.cd\ns2,"Bo ""B"" O",b@b.cd', id="quoted"
        ),
        pytest.param(
            "student_id,name,email\ns1,Ann,a@b.cd\ns2,Bø Ōtsuka-Łukasz,b@b.cd\n".encode(),
            id="unicode",
        ),
    ],
)
def test_ordinary_roster_variants_are_accepted(
    client: TestClient, accounts: dict[str, Account], content: bytes
) -> None:
    response = client.post(
        "/api/v1/roster", headers=accounts["ta"].headers, files={"file": ("roster.csv", content)}
    )
    assert response.status_code == 200, response.text
    assert [s["student_id"] for s in response.json()["students"]] == ["s1", "s2"]
    assert response.json()["students"][0]["name"].startswith("Ann")


def csv_text(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows([["student_id", "name", "email"], *rows])
    return out.getvalue().encode()


ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
ODD_CELL = st.one_of(
    ODD_TEXT,
    st.tuples(st.sampled_from(["=", "+", "-", "@", " ", "\t", "\x00", "\u202e"]), ODD_TEXT).map(
        "".join
    ),
)
PLAIN_ROW = st.tuples(
    st.from_regex(STUDENT_ID, fullmatch=True),
    st.text(alphabet=st.characters(categories=["L", "M", "Nd"]), min_size=1, max_size=12),
    st.from_regex(r"[a-z0-9._]{1,8}@[a-z]{1,8}\.[a-z]{2,4}", fullmatch=True),
).map(list)
ODD_ROW = st.lists(ODD_CELL, min_size=3, max_size=3)
PLAIN_ROWS = st.lists(PLAIN_ROW, min_size=1, max_size=5, unique_by=lambda row: row[0])
ROSTERS = st.one_of(PLAIN_ROWS, st.lists(st.one_of(PLAIN_ROW, ODD_ROW), max_size=5)).map(csv_text)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.one_of(
        st.binary(max_size=2048),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=512).map(
            lambda text: (HEADER.decode() + text).encode()
        ),
        ROSTERS,
    )
)
def test_parse_roster_raises_only_invalid_roster(content: bytes) -> None:
    try:
        entries = parse_roster(content)
    except InvalidRoster as exc:
        assert exc.message and exc.status == 422
    else:
        assert entries
        assert len({e.student_id for e in entries}) == len(entries)
        for entry in entries:
            assert STUDENT_ID.fullmatch(entry.student_id) and "@" in entry.email
            for value in (entry.name, entry.email):
                assert value and value == value.strip()
                assert not value.startswith(("=", "+", "-", "@"))
                assert not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value)
                assert "\u202e" not in value


@hypothesis_settings(max_examples=100, deadline=None)
@given(rows=PLAIN_ROWS, bom=st.booleans(), crlf=st.booleans())
def test_plausible_rosters_are_read_back_exactly(
    rows: list[list[str]], bom: bool, crlf: bool
) -> None:
    content = csv_text(rows)  # csv writes CRLF line ends
    if not crlf:
        content = content.replace(b"\r\n", b"\n")
    entries = parse_roster(b"\xef\xbb\xbf" + content if bom else content)
    assert [[e.student_id, e.name, e.email] for e in entries] == rows
