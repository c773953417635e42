"""Deadline load test: 200 students in the last minutes before an attack phase closes.

Starts the deployment of bench/queue_throughput.py (a throw-away redis-server and PostgreSQL 15,
`autograder up` with two worker processes, 100 evaluation images) with the rate limits on, and
drives it over loopback from one asyncio client: a scenario of rising uploads with bursts, status
polling and leaderboard views, then an acceptance burst at a fixed upload rate. Reports latency per
request type, uploads accepted per second, errors and 429s, and checks that every accepted
submission is scored exactly once. Run it from the repository root: ``python -m
bench.deadline_load``. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
from sqlalchemy import select

from bench.attack_phase import (
    FINAL_STATES,
    REPO,
    BenchError,
    Service,
    _busy_seconds,
    _service_env,
    add_deployment_options,
    machine,
    make_batch,
)
from bench.queue_throughput import (
    EVAL_IMAGES,
    Sample,
    _tree,
    broker_leftovers,
    build_home,
    clean_images,
    collect,
    infrastructure,
    log_counts,
    percentiles,
    summarize,
    wait_drained,
)
from bench.queue_throughput import SERVICE_SETTINGS as QUEUE_SETTINGS
from server.config import Settings
from server.db import session_factory_for
from server.models import Role, Submission
from server.security import create_user, issue_token
from tests.e2e.servers import MARKER_VARIABLE, free_port, marked_processes

RESULTS = REPO / "bench" / "results" / "deadline_load.json"
SERVICE_SETTINGS = {
    **QUEUE_SETTINGS,
    "rate_limits": "true",
    # One loopback address stands for 200 students' own; the per-account limit keeps its default.
    "upload_rate_per_address": "1000000/60",
    "api_processes": "2",  # as docker-compose.yml runs it; one process tops out near one core
}
"""The queue benchmark's two worker processes (one torch thread each), with the rate limits on
and two API processes."""
BURST_AT = (0.5, 0.8, 0.95)
"""Where in the scenario the three bursts start, as fractions of its length."""
BURST_S = 10.0
BURST_FACTOR = 3.0
WINDOW_S = 10.0
HEALTH_EVERY_S = 5.0
POLL_FAST_S, POLL_SLOW_S, POLL_FAST_FOR_S, POLL_RETRY_S = 2.0, 5.0, 60.0, 10.0
"""A student polls like the submission page (server/web/static/app.js): every 2 s for a minute,
then every 5 s, and 10 s after a failed poll."""
KEEPALIVE_S = 4.0
"""Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, so a poll is
never sent on a connection the server is closing (a browser retries such a request itself)."""
TARGET_RATE = 50.0
TARGET_P99_S = 0.5


class Answer(StrEnum):
    """How a request ended, as the load test counts it."""

    ACCEPTED = "accepted"  # 202: an upload queued
    REUSED = "reused"  # 200 to an upload: the same file was already scored
    OK = "ok"  # 2xx to a GET
    RATE_LIMITED = "rate_limited"  # 429, counted apart from errors
    CLIENT_ERROR = "client_error"  # any other 4xx
    SERVER_ERROR = "server_error"  # 5xx
    TIMEOUT = "timeout"
    TRANSPORT = "transport"  # connection refused or reset

    @classmethod
    def of(cls, method: str, status: int) -> Answer:
        if status == 202 or (status == 200 and method == "POST"):
            return cls.ACCEPTED if status == 202 else cls.REUSED
        if 200 <= status < 300:
            return cls.OK
        if status == 429:
            return cls.RATE_LIMITED
        return cls.SERVER_ERROR if status >= 500 else cls.CLIENT_ERROR


SUCCESS = (Answer.ACCEPTED, Answer.REUSED, Answer.OK)
ERRORS = (Answer.CLIENT_ERROR, Answer.SERVER_ERROR, Answer.TIMEOUT, Answer.TRANSPORT)


@dataclass
class Hit:
    """One request: its step, type, start (seconds after the step began) and how it ended."""

    step: str
    kind: str
    at_s: float
    latency_s: float
    answer: Answer
    http_status: int | None

    @property
    def done_s(self) -> float:
        return self.at_s + self.latency_s


@dataclass
class Student:
    username: str
    token: str
    pending: list[str] = field(default_factory=list)
    """Ids of accepted submissions not yet seen final, oldest first."""
    woken: asyncio.Event = field(default_factory=asyncio.Event)


class Batches:
    """Distinct valid batches, cheaply: one `make_batch` batch with the index written into the
    lowest bit of its first 32 values (each stays within 1 of the clean value, inside the ball).
    `make_batch` itself costs about 5 ms a batch, which at 50 uploads/s would take a quarter of a
    core from the service under test."""

    BITS = 32

    def __init__(self, clean: np.ndarray, seed: int) -> None:
        self.payload = make_batch(clean, seed)
        self.offset = len(self.payload) - clean.size  # the .npy header comes first
        first = clean.reshape(-1)[: self.BITS].astype(np.int16)
        self.first = first
        self.step = np.where(first < 255, 1, -1).astype(np.int16)
        self.shifts = np.arange(self.BITS, dtype=np.int64)

    def __call__(self, index: int) -> bytes:
        bits = ((index >> self.shifts) & 1).astype(np.int16)
        values = (self.first + self.step * bits).astype(np.uint8).tobytes()
        return self.payload[: self.offset] + values + self.payload[self.offset + self.BITS :]


def rate_at(t: np.ndarray, *, length_s: float, base: float, peak: float) -> np.ndarray:
    """Uploads per second at ``t``: rising from ``base`` to ``peak`` with the cube of the time
    (most uploads come in the last minutes), three times as many during each burst."""
    rate = base + (peak - base) * (t / length_s) ** 3
    for start in BURST_AT:
        inside = (t >= start * length_s) & (t < start * length_s + BURST_S)
        rate = np.where(inside, rate * BURST_FACTOR, rate)
    return rate


def arrivals(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Upload times (a Poisson process with the rate above, drawn by thinning) and, for each,
    the index of the student who uploads."""
    rng = np.random.default_rng(args.seed)
    length_s = args.minutes * 60.0
    top = args.peak_rate * BURST_FACTOR
    times = np.sort(rng.uniform(0.0, length_s, rng.poisson(top * length_s)))
    rate = rate_at(times, length_s=length_s, base=args.base_rate, peak=args.peak_rate)
    times = times[rng.uniform(0.0, top, times.size) < rate]
    return times, rng.integers(0, args.students, times.size)


# ---------------------------------------------------------------------------------------------
# Accounts


def _settings(env: dict[str, str]) -> Settings:
    """The service's settings, read from the environment it is started with."""
    return Settings.model_validate(
        {
            key.removeprefix("AUTOGRADER_").lower(): value
            for key, value in env.items()
            if key.startswith("AUTOGRADER_")
        }
    )


def enroll(env: dict[str, str], credentials: dict[str, Any], size: int) -> list[Student]:
    """The demo's students and new ones up to ``size``, made in one transaction with the helpers
    the CLI uses (`autograder user add` takes about 1.6 s a call, mostly start-up)."""
    settings = _settings(env)
    pool = [Student(s["username"], s["token"]) for s in credentials["students"]][:size]
    with session_factory_for(settings.db_url)() as session:
        while len(pool) < size:
            name = f"load-{len(pool):03d}-{uuid.uuid4().hex[:6]}"
            user = create_user(session, username=name, role=Role.STUDENT)
            pool.append(
                Student(name, issue_token(session, user=user, secret_key=settings.secret_key))
            )
        session.commit()
    return pool


def phase_rows(env: dict[str, str], assignment: str, phase: str) -> dict[str, tuple[str, int]]:
    """Status and attempts of every submission of the phase, read from the database: the rows
    include any the service saved for a request whose answer the client never got."""
    with session_factory_for(_settings(env).db_url)() as session:
        rows = session.execute(
            select(Submission.id, Submission.status, Submission.attempts).where(
                Submission.assignment_slug == assignment, Submission.phase_id == phase
            )
        )
        return {row.id: (row.status.value, row.attempts) for row in rows}


# ---------------------------------------------------------------------------------------------
# The crowd


@dataclass(frozen=True)
class Reply:
    """What a student's request got back."""

    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


MULTIPART_BOUNDARY = "deadline-load-" + "7" * 24


def multipart(field_name: str, file_name: str, payload: bytes) -> bytes:
    """A ``multipart/form-data`` body with one file part (``MULTIPART_BOUNDARY``), built with one
    copy of ``payload``: the client must stay cheap, it shares the 2 cores with the service."""
    head = (
        f"--{MULTIPART_BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{field_name}"; filename="{file_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return b"".join((head.encode(), payload, f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode()))


class Crowd:
    """The students' client: one HTTP connection pool, every request timed and classified.

    It is aiohttp, not httpx: at 50 uploads/s with a few hundred requests in flight, httpx took
    about 19 ms of CPU per upload, as much as the API itself, and fell 47 s behind schedule."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base: str,
        phase_url: str,
        students: list[Student],
        batches: Batches,
        args: argparse.Namespace,
    ) -> None:
        self.http, self.base, self.phase_url, self.students = http, base, phase_url, students
        self.batches, self.args = batches, args
        self.hits: list[Hit] = []
        self.samples: dict[str, list[Sample]] = {}
        self.sent_late_s: dict[str, list[float]] = {}
        self.numbers = count()
        self.random = random.Random(args.seed)
        self.step, self.step_start = "", 0.0
        self.last_answer = time.perf_counter()
        self.in_flight = 0
        self.failures: Counter[str] = Counter()
        """Requests that failed, by step, type and what happened (an exception or a status)."""
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def settle(self) -> None:
        """Wait for every student task still running (the polling outlives the uploads)."""
        await asyncio.gather(*self.tasks)

    async def stop(self) -> None:
        """Cancel every student task."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def begin(self, step: str) -> None:
        self.step, self.step_start = step, time.perf_counter()
        self.samples[step], self.sent_late_s[step] = [], []

    async def request(
        self, kind: str, method: str, url: str, token: str, **kwargs: Any
    ) -> tuple[Reply | None, Hit]:
        start = time.perf_counter()
        response: Reply | None = None
        self.in_flight += 1
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        try:
            async with self.http.request(
                method, self.base + url, headers=headers, **kwargs
            ) as answered:
                response = Reply(answered.status, await answered.read())
            answer = Answer.of(method, response.status)
            if answer in ERRORS:
                self.failures[f"{self.step} {kind}: HTTP {response.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            answer = Answer.TIMEOUT if isinstance(exc, TimeoutError) else Answer.TRANSPORT
            self.failures[f"{self.step} {kind}: {type(exc).__name__}"] += 1
        finally:
            self.in_flight -= 1
        latency = time.perf_counter() - start
        status = response.status if response is not None else None
        hit = Hit(self.step, kind, start - self.step_start, latency, answer, status)
        self.hits.append(hit)
        if answer in SUCCESS:
            self.last_answer = time.perf_counter()
        return response, hit

    async def upload(self, student: Student, due_s: float) -> None:
        """POST one distinct batch as ``student``; ``due_s`` is when the schedule wanted it sent."""
        late = time.perf_counter() - self.step_start - due_s
        self.sent_late_s[self.step].append(late)
        index = next(self.numbers)
        payload = self.batches(index)
        sample = Sample(
            index=index,
            user=student.username,
            sha256=hashlib.sha256(payload).hexdigest(),
            request_start=datetime.now(UTC),
            post_s=0.0,
            http_status=None,
        )
        self.samples[self.step].append(sample)
        start = time.perf_counter()
        response, hit = await self.request(
            "upload",
            "POST",
            f"{self.phase_url}/submissions",
            student.token,
            data=multipart("file", f"adv-{index}.npy", payload),
            headers={"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"},
        )
        sample.post_s = time.perf_counter() - start
        if response is None:
            sample.refusal = hit.answer.value
            return
        sample.http_status = response.status
        if response.status not in (200, 202):
            sample.refusal = response.body[:300].decode(errors="replace")
            return
        sample.id = response.json()["id"]
        if response.status == 202:
            student.pending.append(sample.id)
            student.woken.set()

    async def follow(self, student: Student, uploads_over: asyncio.Event) -> None:
        """Poll the student's newest unfinished submission the way the submission page does
        until it is final (then look at the leaderboard); return once uploads are over and
        nothing is pending."""
        while True:
            if not student.pending:
                if uploads_over.is_set():
                    return
                student.woken.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(student.woken.wait(), timeout=1.0)
                continue
            submission_id = student.pending[-1]
            watched_since = time.perf_counter()
            delay = POLL_FAST_S
            while submission_id in student.pending:
                await asyncio.sleep(delay * self.random.uniform(0.8, 1.2))
                response, _ = await self.request(
                    "status", "GET", f"/submissions/{submission_id}", student.token
                )
                if response is None or response.status != 200:
                    delay = POLL_RETRY_S
                    continue
                status = response.json()["status"]
                if status in FINAL_STATES:
                    student.pending.remove(submission_id)
                    if status == "scored":
                        await self.leaderboard(student)
                fast = time.perf_counter() - watched_since < POLL_FAST_FOR_S
                delay = POLL_FAST_S if fast else POLL_SLOW_S

    async def browse(self, student: Student, uploads_over: asyncio.Event) -> None:
        """Look at the leaderboard now and then until uploads are over."""
        while True:
            pause = self.random.expovariate(1.0 / self.args.leaderboard_every)
            with suppress(TimeoutError):
                await asyncio.wait_for(uploads_over.wait(), timeout=pause)
                return
            await self.leaderboard(student)

    async def leaderboard(self, student: Student) -> None:
        await self.request("leaderboard", "GET", f"{self.phase_url}/leaderboard", student.token)

    async def scenario(self) -> list[Sample]:
        """Uploads on the deadline schedule, while every student polls and browses; the
        students' polling tasks outlive this coroutine (see `settle`)."""
        self.begin("scenario")
        times, who = arrivals(self.args)
        print(f"scenario: {times.size} uploads over {self.args.minutes:g} min", flush=True)
        over = asyncio.Event()
        for student in self.students:
            self.spawn(self.follow(student, over))
        browsers = [self.spawn(self.browse(s, over)) for s in self.students]
        uploads = await self._send(times.tolist(), [self.students[i] for i in who.tolist()])
        over.set()
        await asyncio.gather(*uploads, *browsers)
        return self.samples["scenario"]

    async def burst(self) -> list[Sample]:
        """Uploads at a fixed rate, round-robin over the students, sent on time whatever the
        answers (an open loop: a slow answer does not delay the next upload)."""
        self.begin("burst")
        total = round(self.args.upload_rate * self.args.burst_seconds)
        print(f"burst: {total} uploads at {self.args.upload_rate:g}/s", flush=True)
        times = [i / self.args.upload_rate for i in range(total)]
        who = [self.students[i % len(self.students)] for i in range(total)]
        await asyncio.gather(*await self._send(times, who))
        return self.samples["burst"]

    async def _send(self, times: list[float], who: list[Student]) -> list[asyncio.Task[None]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for due, student in zip(times, who, strict=True):
            await asyncio.sleep(max(0.0, start + due - loop.time()))
            tasks.append(self.spawn(self.upload(student, due)))
        return tasks


# ---------------------------------------------------------------------------------------------
# The machine's load


PROGRAMS = (
    (b"uvicorn", "api"),
    (b"celery", "worker"),
    (b"redis-server", "redis"),
    (b"postgres", "postgres"),
)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _command_line(pid: int) -> bytes:
    with suppress(FileNotFoundError, ProcessLookupError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def cpu_by_program() -> dict[str, float]:
    """CPU seconds so far of this process and everything it started, by program: the client,
    the API (uvicorn), the workers (celery), redis-server, postgres and the rest (the
    `autograder up` supervisor). A process counts for its nearest named ancestor."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    pending = [(os.getpid(), "client")]
    while pending:
        pid, inherited = pending.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        command = _command_line(pid)
        values = stat.rsplit(")", 1)[1].split()
        program = next((name for key, name in PROGRAMS if key in command), inherited)
        if program == "client" and pid != os.getpid():
            program = "other"
        # utime, stime and the children it has reaped (postgres's exited backends)
        seconds = sum(int(v) for v in values[11:15]) / ticks
        totals[program] = totals.get(program, 0.0) + seconds
        pending += [(child, program) for child in _children(pid)]
    return totals


class LoadMeter:
    """Samples every ``every`` seconds: the 1-minute load average and the shares of the
    machine's CPU that our processes and all the others used since the last sample."""

    def __init__(self, every: float = WINDOW_S) -> None:
        self.every = every
        self.samples: list[dict[str, float]] = []
        self.cores = os.cpu_count() or 1
        self.first = self._mark()

    @staticmethod
    def _mark() -> tuple[float, float, float]:
        return time.perf_counter(), _busy_seconds(), sum(cpu_by_program().values())

    def share(self, before: tuple[float, float, float]) -> dict[str, float]:
        wall, busy, ours = (a - b for a, b in zip(self._mark(), before, strict=True))
        return {
            "ours": ours / (wall * self.cores),
            "others": max(0.0, busy - ours) / (wall * self.cores),
        }

    async def run(self) -> None:
        before = self._mark()
        while True:
            await asyncio.sleep(self.every)
            now = self._mark()
            self.samples.append(
                {"at": time.time(), "load1": os.getloadavg()[0], **self.share(before)}
            )
            before = now


# ---------------------------------------------------------------------------------------------
# Figures


def window_rates(hits: list[Hit], length_s: float) -> list[float]:
    """Uploads accepted per second in each full ``WINDOW_S`` window of the step, by the time
    the 202 arrived."""
    windows = int(length_s // WINDOW_S)
    counts = Counter(
        int(h.done_s // WINDOW_S)
        for h in hits
        if h.kind == "upload" and h.answer is Answer.ACCEPTED
    )
    return [counts[w] / WINDOW_S for w in range(windows)]


def in_flight_peaks(hits: list[Hit]) -> list[int]:
    """The most requests the client had waiting for an answer at once, per ``WINDOW_S`` window."""
    events = sorted([(h.at_s, 1) for h in hits] + [(h.done_s, -1) for h in hits])
    peaks: dict[int, int] = {}
    level = 0
    for moment, change in events:
        level += change
        window = int(moment // WINDOW_S)
        peaks[window] = max(peaks.get(window, 0), level)
    return [peaks.get(w, 0) for w in range(max(peaks, default=-1) + 1)]


def by_kind(hits: list[Hit]) -> dict[str, dict[str, Any]]:
    """Per request type: how the requests ended and the latency of the answered ones."""
    table: dict[str, dict[str, Any]] = {}
    for kind in sorted({h.kind for h in hits}):
        mine = [h for h in hits if h.kind == kind]
        answers = Counter(h.answer.value for h in mine)
        errors = sum(answers[a.value] for a in ERRORS)
        table[kind] = {
            "requests": len(mine),
            "answers": dict(answers),
            "error_rate": errors / len(mine),
            "rate_limited": answers[Answer.RATE_LIMITED.value],
            "latency_s": percentiles([h.latency_s for h in mine if h.answer in SUCCESS]),
        }
    return table


def per_minute(hits: list[Hit]) -> list[dict[str, Any]]:
    """The scenario minute by minute: uploads sent and accepted, and p99 latency per type."""
    rows = []
    for minute in range(int(max((h.at_s for h in hits), default=0.0) // 60) + 1):
        mine = [h for h in hits if minute * 60 <= h.at_s < (minute + 1) * 60]
        uploads = [h for h in mine if h.kind == "upload"]
        row: dict[str, Any] = {
            "minute": minute + 1,
            "uploads": len(uploads),
            "accepted": sum(h.answer is Answer.ACCEPTED for h in uploads),
            "errors": sum(h.answer in ERRORS for h in mine),
            "rate_limited": sum(h.answer is Answer.RATE_LIMITED for h in mine),
        }
        for kind in ("upload", "status", "leaderboard"):
            ok = [h.latency_s for h in mine if h.kind == kind and h.answer in SUCCESS]
            row[f"{kind}_requests"] = len([h for h in mine if h.kind == kind])
            row[f"{kind}_p50_s"] = float(np.percentile(ok, 50)) if ok else None
            row[f"{kind}_p99_s"] = float(np.percentile(ok, 99)) if ok else None
        rows.append(row)
    return rows


def step_figures(
    hits: list[Hit], samples: list[Sample], late: list[float], length_s: float
) -> dict[str, Any]:
    uploads = [h for h in hits if h.kind == "upload"]
    accepted = [h for h in uploads if h.answer is Answer.ACCEPTED]
    last_202 = max((h.done_s for h in accepted), default=float("nan"))
    rates = window_rates(hits, length_s)
    return {
        "length_s": length_s,
        "uploads_sent": len(uploads),
        "uploads_accepted": len(accepted),
        "accepted_per_s": len(accepted) / last_202 if accepted else 0.0,
        "accepted_per_s_windows": rates,
        "accepted_per_s_peak_window": max(rates, default=0.0),
        "accepted_per_s_lowest_window": min(rates, default=0.0),
        "send_lateness_s": percentiles(late),
        "in_flight_peak_windows": in_flight_peaks(hits),
        "requests": by_kind(hits),
        "scoring": summarize(samples, drained=True) if samples else {},
    }


def print_step(name: str, figures: dict[str, Any]) -> None:
    print(f"\n== {name} ==")
    print(
        f"uploads sent {figures['uploads_sent']}, accepted (202) {figures['uploads_accepted']}; "
        f"{figures['accepted_per_s']:.1f} accepted/s overall, 10-s windows "
        f"{figures['accepted_per_s_lowest_window']:.1f} to "
        f"{figures['accepted_per_s_peak_window']:.1f}/s; sends late by p99 "
        f"{figures['send_lateness_s'].get('p99', 0.0) * 1000:.0f} ms"
    )
    print(
        f"{'request':12} {'n':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  answers"
    )
    for kind, row in figures["requests"].items():
        lat = row["latency_s"]
        cells = (
            " ".join(f"{lat[k] * 1000:8.0f}" for k in ("p50", "p90", "p99", "max"))
            if lat
            else " " * 35
        )
        print(f"{kind:12} {row['requests']:6d} {cells}  {row['answers']}")
    if figures.get("stalled_at_s") is not None:
        print(
            f"STALLED: nothing answered after {figures['stalled_at_s']:.0f} s; answers again "
            f"after {figures['recovered_after_s']} s"
            + (
                f"; API restarted, answering {figures['answers_after_restart_s']:.0f} s later"
                if figures.get("api_restarted")
                else ""
            )
        )
    cpu = figures.get("cpu_s_while_sending")
    if cpu:
        print(
            f"CPU seconds while sending ({figures['sending_wall_s']:.0f} s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        )
    scoring = figures["scoring"]
    if scoring:
        print(
            f"scored {scoring['scored']} of {scoring['accepted']} accepted; lost "
            f"{scoring['lost']} {scoring['statuses']}; attempts > 1: {scoring['attempts_over_1']}"
        )


def exactly_once(
    samples: list[Sample], rows: dict[str, tuple[str, int]], logged: dict[str, Any]
) -> dict[str, Any]:
    """Every submission the run created is scored, none was attempted twice, no 202 the client
    saw is missing from the database, and the workers' log shows one scoring run per scored
    submission (a second run would show as one more)."""
    accepted = {s.id for s in samples if s.id is not None and s.http_status == 202}
    statuses = Counter(status for status, _ in rows.values())
    runs = logged["task_runs_by_outcome"]
    once = {
        "accepted_seen_by_client": len(accepted),
        "rows_created": len(rows),
        "rows_without_a_202_seen": len(set(rows) - accepted),
        "accepted_missing_from_database": len(accepted - set(rows)),
        "statuses": dict(statuses),
        "not_scored": len(rows) - statuses["scored"],
        "attempts_over_1": sum(attempts > 1 for _, attempts in rows.values()),
        "scoring_runs_scored": runs.get("scored", 0),
        "duplicate_deliveries_skipped": runs.get("skipped", 0),
        "runs_failed": runs.get("failed", 0),
    }
    once["met"] = (
        once["not_scored"] == 0
        and once["attempts_over_1"] == 0
        and once["accepted_missing_from_database"] == 0
        and once["scoring_runs_scored"] == statuses["scored"]
    )
    return once


def acceptance_target(burst: dict[str, Any], rate: float) -> dict[str, Any]:
    upload = burst["requests"].get("upload", {})
    p99 = upload.get("latency_s", {}).get("p99", float("inf"))
    errors = sum(upload.get("answers", {}).get(a.value, 0) for a in ERRORS)
    held = burst["accepted_per_s_lowest_window"]
    return {
        "offered_per_s": rate,
        "accepted_per_s": burst["accepted_per_s"],
        "lowest_10s_window_per_s": held,
        "p99_s": p99,
        "errors": errors,
        "rate_limited": upload.get("rate_limited", 0),
        "met": rate >= TARGET_RATE
        and held >= TARGET_RATE * 0.95
        and p99 < TARGET_P99_S
        and errors == 0
        and upload.get("rate_limited", 0) == 0,
    }


# ---------------------------------------------------------------------------------------------
# Profiling the API (optional)


@contextmanager
def profiled(api_pid: int | None, py_spy: Path | None, seconds: float, out: Path) -> Iterator[None]:
    """Sample the API process with py-spy while the block runs, into ``out`` (collapsed stacks;
    py-spy pauses the process for each of its 100 samples a second, a few per cent)."""
    if py_spy is None or api_pid is None:
        yield
        return
    recorder = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(api_pid),
            "--duration",
            str(round(seconds)),
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        try:
            recorder.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            recorder.send_signal(signal.SIGINT)
            recorder.wait()


STAGES: tuple[
    tuple[str, set[str], tuple[str, ...]], ...
] = (  # label, function names, file names; the frame nearest the leaf that matches wins
    ("DB commits (the row, then the task id)", {"commit"}, ()),
    ("threat-model check", {"check_threat_model"}, ()),
    ("parse the batch (read_batch)", {"read_batch"}, ()),
    ("store the batch (np.save, move)", {"save", "move"}, ()),
    ("window, reuse and quota queries", {"_check_window", "find_reusable", "_check_quota"}, ()),
    ("copy the upload to disk + sha256", {"receive_upload"}, ()),
    ("multipart parsing", set(), ("formparsers.py", "multipart")),
    ("enqueue (send the task, record it)", {"enqueue"}, ()),
    ("response (to_public, queue_position)", {"to_public"}, ()),
    ("authentication", {"get_optional_user"}, ()),
    ("rate-limit middleware", set(), ("ratelimit.py",)),
    ("status polls", {"get_submission"}, ()),
    ("leaderboard views", {"get_leaderboard"}, ()),
)


def _stage(frame: str) -> str | None:
    name, _, where = frame.partition(" (")
    return next(
        (
            label
            for label, names, files in STAGES
            if name in names or any(f in where for f in files)
        ),
        None,
    )


IDLE_LEAVES = ("Condition.wait (", "Queue.get (", "select (")
"""Leaf frames of a thread that waits for work, which py-spy can still report as running."""


def stage_shares(collapsed: Path) -> dict[str, float]:
    """Share of the API's busy samples under each stage of accepting an upload: a frame's
    samples count for the stage nearest the leaf (a commit is a commit wherever it is called)."""
    totals: Counter[str] = Counter()
    for line in collapsed.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit() or stack.rsplit(";", 1)[-1].startswith(IDLE_LEAVES):
            continue
        label = next(
            (found for frame in reversed(stack.split(";")) if (found := _stage(frame))),
            "other: the event loop (uvloop, httptools), FastAPI, pydantic, anyio",
        )
        totals[label] += int(number)
    everything = sum(totals.values()) or 1
    return {label: n / everything for label, n in totals.most_common()}


# ---------------------------------------------------------------------------------------------


async def stalled(crowd: Crowd, stall_s: float) -> None:
    """Return once requests have been waiting ``stall_s`` seconds with none answered 2xx."""
    while crowd.in_flight == 0 or time.perf_counter() - crowd.last_answer < stall_s:
        await asyncio.sleep(1.0)


async def recovered(base: str, timeout: float) -> float | None:
    """Seconds until `/health` answers again within 5 s; ``None`` if not within ``timeout``."""
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as probe:
        while time.perf_counter() - started < timeout:
            with suppress(httpx.HTTPError):
                if (await probe.get("/health")).status_code == 200:
                    return time.perf_counter() - started
            await asyncio.sleep(HEALTH_EVERY_S)
    return None


def _sent(
    crowd: Crowd, record: dict[str, Any], cpu_before: dict[str, float], _: asyncio.Task[Any]
) -> None:
    """Note the wall time and the CPU seconds by program that sending a step's uploads took."""
    now = cpu_by_program()
    record["sending_wall_s"] = time.perf_counter() - crowd.step_start
    record["cpu_s_while_sending"] = {k: v - cpu_before.get(k, 0.0) for k, v in sorted(now.items())}


async def drive(
    base: str,
    phase_url: str,
    students: list[Student],
    api: ApiProcesses,
    args: argparse.Namespace,
) -> tuple[Crowd, dict[str, dict[str, Any]], LoadMeter]:
    """Run the steps, wait for each to drain, then read every accepted submission back. A step
    whose requests go unanswered for ``args.stall_s`` is stopped; the service then has
    ``args.recover_s`` to answer again, or its API is restarted, and ``args.timeout`` to
    drain before the next step."""
    pool = aiohttp.TCPConnector(limit=args.connections, keepalive_timeout=KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with (  # httpx for the bench's own reads (download, drain, read-back)
        httpx.AsyncClient(base_url=base, timeout=args.request_timeout) as http,
        aiohttp.ClientSession(connector=pool, timeout=timeout) as students_http,
    ):
        clean = await clean_images(http, phase_url, students[0].token)
        crowd = Crowd(students_http, base, phase_url, students, Batches(clean, args.seed), args)
        meter = LoadMeter()
        metering = asyncio.create_task(meter.run())
        records: dict[str, dict[str, Any]] = {}
        settle = argparse.Namespace(poll_interval=HEALTH_EVERY_S, timeout=args.timeout)
        for step in args.steps:
            sending = asyncio.create_task(crowd.scenario() if step == "scenario" else crowd.burst())
            started, cpu_before = time.perf_counter(), cpu_by_program()
            record: dict[str, Any] = {"stalled_at_s": None, "recovered_after_s": None}
            sending.add_done_callback(partial(_sent, crowd, record, cpu_before))
            draining = asyncio.create_task(wait_drained(http, sending, settle))
            watchdog = asyncio.create_task(stalled(crowd, args.stall_s))
            with profiled(
                api.main()[0] if api.main() else None,
                args.py_spy if step == "burst" else None,
                args.burst_seconds,
                args.out.with_suffix(".api-profile.txt"),
            ):
                await asyncio.wait({draining, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if draining.done():
                watchdog.cancel()
                await sending
                await crowd.settle()
                record["drained"] = draining.result()
            else:
                record["stalled_at_s"] = crowd.last_answer - crowd.step_start
                print(
                    f"{step}: no request answered for {args.stall_s:.0f} s (last answer at "
                    f"{record['stalled_at_s']:.0f} s); stopping the students",
                    flush=True,
                )
                for task in (sending, draining):
                    task.cancel()
                await asyncio.gather(sending, draining, return_exceptions=True)
                await crowd.stop()
                record["recovered_after_s"] = await recovered(base, args.recover_s)
                if record["recovered_after_s"] is None:
                    print(f"{step}: no answer after {args.recover_s:.0f} s; restarting the API")
                    api.restart()
                    record["api_restarted"] = True
                    record["answers_after_restart_s"] = await recovered(base, args.recover_s)
                print(f"{step}: recovery {record}", flush=True)
                try:
                    settled = wait_drained(http, sending, settle)
                    record["drained"] = await asyncio.wait_for(settled, args.timeout)
                except TimeoutError:
                    record["drained"] = False
            record["drain_wall_s"] = time.perf_counter() - started
            records[step] = record
            if not record["drained"]:
                print(f"warning: {step} did not drain within {args.timeout:.0f} s; stopping")
                break
        metering.cancel()
        tokens = {s.username: s.token for s in students}
        for samples in crowd.samples.values():
            await collect(http, samples, tokens, concurrency=8)
    return crowd, records, meter


@dataclass(frozen=True)
class ApiProcesses:
    """The uvicorn processes of this run's `autograder up`, found by the run's marker."""

    marker: str

    def main(self) -> list[int]:
        return sorted(pid for pid, cmd in marked_processes(self.marker).items() if "uvicorn" in cmd)

    def pids(self) -> list[int]:
        """uvicorn, and the processes it started when it runs several (`api_processes`)."""
        return sorted(self.main() + [child for pid in self.main() for child in _children(pid)])

    def serving(self) -> int:
        """How many processes answer requests: uvicorn's workers (not multiprocessing's
        resource tracker beside them), or uvicorn itself."""
        main = self.main()
        workers = [
            child
            for pid in main
            for child in _children(pid)
            if b"spawn_main" in _command_line(child)
        ]
        return len(workers) or len(main)

    def restart(self) -> None:
        """Kill the API, as an operator restarts a hung one; `autograder up` starts it again."""
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tree = _tree()
    keep_home = args.home is not None or args.keep
    home = Path(args.home or tempfile.mkdtemp(prefix="autograder-load-bench-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="autograder-load-bench-servers-"))
    marker, port = uuid.uuid4().hex, free_port()
    log = home / f"bench-load-{marker[:8]}.log"
    settings: dict[str, str] = {}
    try:
        with infrastructure(args.database, scratch) as (servers, redis_port):
            settings = {**SERVICE_SETTINGS, **args.setting, **servers}
            env = _service_env(home, port, settings) | {MARKER_VARIABLE: marker}
            credentials = build_home(home, env)
            students = enroll(env, credentials, args.students)
            where = (credentials["assignment"], credentials["attack_phase"])
            phase_url = f"/assignments/{where[0]}/phases/{where[1]}"
            before = phase_rows(env, *where)
            base = f"http://127.0.0.1:{port}/api/v1"
            service = Service(env, log)
            try:
                with httpx.Client(base_url=base, timeout=30.0) as probe:
                    health = service.wait_healthy(probe)
                api = ApiProcesses(marker)
                api_processes = api.serving()
                print(
                    f"service healthy on port {port}: {api_processes} API process(es), "
                    f"worker(s) {[w['hostname'] for w in health['workers']]} with "
                    f"{settings['worker_concurrency']} pool processes; {len(students)} students; "
                    f"steps {', '.join(args.steps)}",
                    flush=True,
                )
                load_before, cpu_before = os.getloadavg(), cpu_by_program()
                crowd, records, meter = asyncio.run(drive(base, phase_url, students, api, args))
                cpu_after, load_after = cpu_by_program(), os.getloadavg()
                whole = meter.share(meter.first)
                left_in_broker = broker_leftovers(redis_port)
                rows = {k: v for k, v in phase_rows(env, *where).items() if k not in before}
            finally:
                code = service.stop()
                leftovers = marked_processes(marker)
                for pid in leftovers:  # started by this run's `autograder up`
                    os.kill(pid, signal.SIGKILL)
                print(f"service stopped (exit code {code}; {len(leftovers)} leftover processes)")
            logged = log_counts(log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
    steps = {}
    for step, record in records.items():
        hits = [h for h in crowd.hits if h.step == step]
        length = args.minutes * 60.0 if step == "scenario" else args.burst_seconds
        steps[step] = step_figures(hits, crowd.samples[step], crowd.sent_late_s[step], length)
        if step == "scenario":
            steps[step]["per_minute"] = per_minute(hits)
            steps[step]["requests_before_deadline"] = by_kind([h for h in hits if h.at_s < length])
        steps[step].update(record)
        print_step(step, steps[step])
    once = exactly_once([s for ss in crowd.samples.values() for s in ss], rows, logged)
    cpu = {k: cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0) for k in cpu_after}
    print(
        f"\nexactly once: {once['rows_created']} submissions saved "
        f"({once['accepted_seen_by_client']} answered 202, "
        f"{once['rows_without_a_202_seen']} whose answer the client did not get), "
        f"statuses {once['statuses']}, {once['attempts_over_1']} attempted twice, "
        f"{once['scoring_runs_scored']} scoring runs, {once['duplicate_deliveries_skipped']} "
        "duplicate deliveries skipped: " + ("met" if once["met"] else "NOT met")
    )
    print(f"failed requests: {dict(crowd.failures)}")
    print(f"sweeper re-sends: {logged['sweep_sent']}; left in Redis: {left_in_broker}")
    print("CPU seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items())))
    print(
        f"other processes used {whole['others']:.0%} of the machine's CPU, ours {whole['ours']:.0%}"
    )
    report: dict[str, Any] = {
        "benchmark": "deadline_load",
        "recorded_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "tree": tree,
        "setup": {
            "database": args.database,
            "broker": "redis-server (appendonly yes)",
            "eval_images": EVAL_IMAGES,
            "api_processes": api_processes,
            "students": len(students),
            "steps": args.steps,
            "scenario": {
                "minutes": args.minutes,
                "base_rate_per_s": args.base_rate,
                "peak_rate_per_s": args.peak_rate,
                "bursts_at": BURST_AT,
                "burst_s": BURST_S,
                "burst_factor": BURST_FACTOR,
                "status_polls_s": {
                    "fast": POLL_FAST_S,
                    "slow": POLL_SLOW_S,
                    "fast_for": POLL_FAST_FOR_S,
                    "after_error": POLL_RETRY_S,
                },
                "leaderboard_every_s": args.leaderboard_every,
            },
            "burst": {"upload_rate_per_s": args.upload_rate, "seconds": args.burst_seconds},
            "client": {
                "connections": args.connections,
                "request_timeout_s": args.request_timeout,
                "stall_s": args.stall_s,
            },
            "service_settings": {
                k: v for k, v in settings.items() if k not in ("database_url", "celery_broker_url")
            },
            "upload_rate_per_user": settings.get(
                "upload_rate_per_user", Settings.model_fields["upload_rate_per_user"].default
            ),
        },
        "machine": machine(settings),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "cpu_share_whole_run": whole,
        "load_timeline": meter.samples,
        "cpu_seconds": cpu,
        "broker_left": left_in_broker,
        "service_log": logged,
        "steps": steps,
        "exactly_once": once,
        "failures": dict(crowd.failures),
        "hits": [astuple(h) for h in crowd.hits],
    }
    if "burst" in steps:
        report["acceptance_target"] = acceptance_target(steps["burst"], args.upload_rate)
        target = report["acceptance_target"]
        print(
            f"target {TARGET_RATE:g} uploads/s accepted with p99 < {TARGET_P99_S * 1000:.0f} ms "
            f"and none lost: {'met' if target['met'] and once['met'] else 'NOT met'} "
            f"(lowest 10-s window {target['lowest_10s_window_per_s']:.1f}/s, p99 "
            f"{target['p99_s'] * 1000:.0f} ms, {target['errors']} errors, "
            f"{target['rate_limited']} x 429)"
        )
    profile = args.out.with_suffix(".api-profile.txt")
    if args.py_spy is not None and profile.is_file():
        report["api_profile_burst"] = stage_shares(profile)
        print("API profile during the burst (share of busy samples):")
        for label, share in report["api_profile_burst"].items():
            print(f"  {share:6.1%}  {label}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=10.0, help="scenario length")
    parser.add_argument(
        "--base-rate", type=float, default=0.5, help="uploads/s at the scenario's start"
    )
    parser.add_argument(
        "--peak-rate", type=float, default=8.0, help="uploads/s at its end, before bursts"
    )
    parser.add_argument(
        "--leaderboard-every",
        type=float,
        default=60.0,
        help="mean seconds between a student's leaderboard views (and one after each score)",
    )
    parser.add_argument(
        "--upload-rate", type=float, default=TARGET_RATE, help="uploads/s in the acceptance burst"
    )
    parser.add_argument("--burst-seconds", type=float, default=60.0)
    parser.add_argument(
        "--steps",
        type=lambda text: text.split(","),
        default=["scenario", "burst"],
        help="comma-separated: scenario, burst (default both, in that order)",
    )
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--connections", type=int, default=512, help="client connection pool")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument(
        "--stall-s",
        type=float,
        default=120.0,
        help="stop a step when requests wait this long with none answered",
    )
    parser.add_argument(
        "--recover-s",
        type=float,
        default=300.0,
        help="after a stall, wait this long for an answer before restarting the API",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for a step to drain"
    )
    parser.add_argument(
        "--py-spy", type=Path, help="py-spy binary: sample one API process during the burst"
    )
    add_deployment_options(parser, settings=SERVICE_SETTINGS, results=RESULTS)
    args = parser.parse_args(argv)
    args.setting = dict(args.setting)
    if not set(args.steps) <= {"scenario", "burst"} or not args.steps:
        parser.error("--steps takes scenario, burst or both")
    if min(args.students, args.minutes, args.peak_rate, args.upload_rate, args.burst_seconds) <= 0:
        parser.error(
            "--students, --minutes, --peak-rate, --upload-rate, --burst-seconds must be > 0"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Stop cleanly (the finally blocks stop the service) on Ctrl-C or a kill, also when started
    # in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run(args)
    except (BenchError, pytest.fail.Exception, pytest.skip.Exception) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(report, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0 if report["exactly_once"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
