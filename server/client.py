"""The command-line client's HTTP side: upload with progress, then poll until a final state."""

from __future__ import annotations

import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

FINAL_STATES = {"scored", "failed", "cancelled"}
DEFAULT_CONFIG = Path("~/.config/autograder/client.toml")


class ClientError(Exception):
    """The server refused a request or could not be reached; the message is the server's."""

    def __init__(self, message: str, *, code: str = "client_error", details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class ClientConfig(BaseSettings):
    """Where the client talks to: ``AUTOGRADER_URL`` and ``AUTOGRADER_TOKEN``, or a TOML file.

    The file (``AUTOGRADER_CONFIG``, default ``~/.config/autograder/client.toml``) holds
    ``url = "..."`` and ``token = "..."``; the environment wins over the file.
    """

    model_config = SettingsConfigDict(env_prefix="AUTOGRADER_", extra="ignore")

    url: str | None = None
    token: str | None = None
    config: Path = Field(default=DEFAULT_CONFIG)

    def resolved(self) -> tuple[str, str]:
        path = self.config.expanduser()
        from_file: dict[str, Any] = {}
        if path.is_file():
            from_file = tomllib.loads(path.read_text(encoding="utf-8"))
        url = self.url or from_file.get("url")
        token = self.token or from_file.get("token")
        if not url or not token:
            raise ClientError(
                "Set AUTOGRADER_URL and AUTOGRADER_TOKEN (or write url and token to "
                f"{path}), e.g. export AUTOGRADER_URL=http://127.0.0.1:8000",
                code="not_configured",
            )
        return str(url).rstrip("/"), str(token)


class _ProgressReader:
    """A file wrapper that reports how many bytes were read (httpx reads it in chunks)."""

    def __init__(self, handle: BinaryIO, total: int, report: Callable[[int, int], None]) -> None:
        self.handle, self.total, self.report, self.sent = handle, total, report, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.handle.read(size)
        if chunk:
            self.sent += len(chunk)
            self.report(self.sent, self.total)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        self.sent = 0
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def fileno(self) -> int:
        return self.handle.fileno()

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(64 * 1024):
            yield chunk


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise ClientError(error["message"], code=error["code"], details=error.get("details"))
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"HTTP {response.status_code}: {response.text[:500]}") from None


class AutograderClient:
    def __init__(self, url: str, token: str, *, timeout: float = 120.0) -> None:
        self.http = httpx.Client(
            base_url=f"{url}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(
                f"Cannot reach the autograder at {self.http.base_url}: {exc}", code="unreachable"
            ) from exc
        _raise_for_error(response)
        return response.json()

    def submit(
        self,
        assignment: str,
        phase: str,
        path: Path,
        *,
        fields: dict[str, str] | None = None,
        manifest: Path | None = None,
        report: Callable[[int, int], None] = lambda sent, total: None,
    ) -> dict[str, Any]:
        """Upload a batch (attack phases) or a checkpoint with its ``fields`` (architecture,
        normalization or mean/std) or a JSON ``manifest`` file (defense phases)."""
        with path.open("rb") as handle:
            reader = _ProgressReader(handle, path.stat().st_size, report)
            files: dict[str, Any] = {"file": (path.name, reader, "application/octet-stream")}
            if manifest is not None:
                files["manifest"] = (manifest.name, manifest.read_bytes(), "application/json")
            return dict(
                self._request(
                    "POST",
                    f"/assignments/{assignment}/phases/{phase}/submissions",
                    files=files,
                    data=fields or {},
                )
            )

    def submission(self, submission_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/submissions/{submission_id}"))

    def wait(
        self,
        submission_id: str,
        *,
        timeout: float,
        interval: float = 1.0,
        report: Callable[[dict[str, Any]], None] = lambda s: None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            submission = self.submission(submission_id)
            report(submission)
            if submission["status"] in FINAL_STATES:
                return submission
            if time.monotonic() > deadline:
                raise ClientError(
                    f"Submission {submission_id} is still {submission['status']} after "
                    f"{timeout:.0f} s; check later with `autograder status {submission_id}`.",
                    code="timeout",
                )
            time.sleep(interval)


def print_progress(sent: int, total: int) -> None:
    percent = 100 * sent / total if total else 100
    end = "\n" if sent >= total else ""
    print(
        f"\ruploading: {percent:5.1f}% ({sent / 2**20:.2f} of {total / 2**20:.2f} MiB)",
        end=end,
        file=sys.stderr,
        flush=True,
    )
