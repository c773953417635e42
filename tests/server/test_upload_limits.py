"""Body caps while the body streams in: a request over its route's cap gets 413 from its
Content-Length before a byte is read, or as soon as the streamed bytes pass the cap, through a
real uvicorn server as well as the test client; nothing is stored, spooled or counted."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from server.config import Settings
from server.db import session_factory_for
from server.main import create_app
from server.models import Submission, User
from server.upload_limits import MULTIPART_ALLOWANCE, OTHER_BODY_BYTES
from tests.conftest import PHASE, SLUG, Account

UPLOAD_URL = f"/api/v1/assignments/{SLUG}/phases/{PHASE}/submissions"
PHASE_LIMIT = 1024 * 1024  # max_upload_mb = 1 in the test spec
CHUNK = 64 * 1024
BOUNDARY = "hostile-upload-boundary"


class Body:
    """A multipart upload streamed in 64 KiB chunks, counting what the client was asked for."""

    def __init__(self, file_bytes: int, name: str = "adv.npy") -> None:
        self.file_bytes = file_bytes
        self.name = name
        self.produced = 0

    def __iter__(self) -> Iterator[bytes]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{self.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        self.produced += len(head)
        yield head
        left = self.file_bytes
        while left > 0:
            chunk = bytes(min(CHUNK, left))
            left -= len(chunk)
            self.produced += len(chunk)
            yield chunk
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        self.produced += len(tail)
        yield tail


def multipart_headers(account: Account) -> dict[str, str]:
    return {**account.headers, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def nothing_received(settings: Settings) -> None:
    with session_factory_for(settings.db_url)() as session:
        assert session.scalar(select(func.count()).select_from(Submission)) == 0
    assert not [p for p in settings.upload_path.rglob("*") if p.is_file()]


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """``app`` behind a real uvicorn server on a free local port, for the block's duration."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.mark.parametrize(
    ("url", "who", "name", "says", "limit"),
    [
        (UPLOAD_URL, "alice", "adv.npy", "1.0 MiB", PHASE_LIMIT),
        ("/api/v1/roster", "ta", "roster.csv", "1 MiB", 1024 * 1024),
    ],
    ids=["attack-batch", "roster"],
)
def test_a_streamed_upload_is_cut_off_at_the_cap_by_a_real_server(
    settings: Settings,
    db,
    accounts: dict[str, Account],
    url: str,
    who: str,
    name: str,
    says: str,
    limit: int,
) -> None:
    body = Body(64 * limit, name=name)  # 64 MiB, sent chunked: no Content-Length to go by
    with served(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as client:
        response = client.post(url, headers=multipart_headers(accounts[who]), content=body)
    # The server stopped reading near the cap: the client never produced most of the body.
    assert body.produced < 16 * limit, body.produced
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "file_too_large" and says in error["message"]
    assert error["details"] == {"limit_bytes": limit}
    assert response.headers["connection"] == "close"
    nothing_received(settings)
    with session_factory_for(settings.db_url)() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 3


def test_a_declared_length_over_the_cap_is_refused_before_a_byte_is_read(
    client: TestClient, settings: Settings, accounts: dict[str, Account]
) -> None:
    body = Body(512 * PHASE_LIMIT)
    headers = {
        **multipart_headers(accounts["alice"]),
        "content-length": str(512 * PHASE_LIMIT + 200),
    }
    response = client.post(UPLOAD_URL, headers=headers, content=iter(body))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert body.produced == 0
    nothing_received(settings)


@pytest.mark.parametrize(
    ("file_bytes", "status"),
    [
        (PHASE_LIMIT + MULTIPART_ALLOWANCE + 1, 413),  # the body's cap: the middleware
        (PHASE_LIMIT + 1, 413),  # within the multipart allowance: the file's own cap
        (PHASE_LIMIT - 1, 415),  # under both: read, and refused for what it is (zeros)
    ],
)
def test_the_cap_counts_streamed_bytes_without_a_content_length(
    client: TestClient,
    settings: Settings,
    accounts: dict[str, Account],
    file_bytes: int,
    status: int,
) -> None:
    response = client.post(
        UPLOAD_URL, headers=multipart_headers(accounts["alice"]), content=iter(Body(file_bytes))
    )
    assert response.status_code == status, response.text
    if status == 413:
        assert response.json()["error"]["code"] == "file_too_large"
        assert "1.0 MiB" in response.json()["error"]["message"]
    nothing_received(settings)


def test_the_roster_cap_is_enforced_while_streaming(
    client: TestClient, settings: Settings, accounts: dict[str, Account]
) -> None:
    body = Body(2 * 1024 * 1024, name="roster.csv")
    response = client.post(
        "/api/v1/roster", headers=multipart_headers(accounts["ta"]), content=iter(body)
    )
    assert response.status_code == 413
    assert "1 MiB" in response.json()["error"]["message"]
    with session_factory_for(settings.db_url)() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 3


def test_other_requests_are_capped_too(client: TestClient) -> None:
    """An unauthenticated JSON endpoint cannot be made to read a huge body into memory."""
    response = client.post(
        "/api/v1/invitations/accept",
        content=b'{"code": "' + b"x" * OTHER_BODY_BYTES + b'", "password": "p"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    small = client.post("/api/v1/invitations/accept", json={"code": "x", "password": "p" * 12})
    assert small.status_code == 400  # an unknown code: read and answered as usual
