"""Queue throughput benchmark: a burst of attack-phase submissions through Redis and two workers.

Builds a demo course with 100 evaluation images, starts a throw-away redis-server (and PostgreSQL
15 unless ``--database sqlite``), runs `autograder up` with two prefork worker processes on the cpu
queue, submits distinct batches from several students over HTTP, waits until the queue drains, and
reports throughput, submit-to-scored latency and how many accepted submissions were not scored.
Run it from the repository root: ``python -m bench.queue_throughput``. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from bench.attack_phase import (
    DEMO_TRAINING,
    FINAL_STATES,
    REPO,
    BenchError,
    Service,
    _cli,
    _cpu_marks,
    _others_share,
    _parse_time,
    _service_env,
    add_deployment_options,
    machine,
    make_batch,
)
from server.assignments import Track, load_assignment
from tests.e2e.servers import (
    MARKER_VARIABLE,
    free_port,
    marked_processes,
    postgres_server,
    redis_server,
)

RESULTS = REPO / "bench" / "results" / "queue_throughput.json"
EVAL_IMAGES = 100
SERVICE_SETTINGS = {
    "worker_concurrency": "2",
    "worker_queues": "cpu",
    "torch_threads": "1",
    "rate_limits": "false",  # 100 uploads a minute per student here: the bench is not a class
}
"""Two prefork worker processes on the cpu queue, one torch thread each (two cores in all)."""
NO_LIMIT_PER_DAY = 1_000_000
LIMITS_LINE = re.compile(r"^limits = \{.*\}$", re.MULTILINE)
SWEEP_LINE = re.compile(
    r"autograder: sweep SweepReport\(requeued=(\d+), failed=(\d+), sent=(\d+)\)"
)
TASK_LINE = re.compile(
    r"/(ForkPoolWorker-\d+)\].*Task worker\.tasks\.score_submission\[[^\]]+\] succeeded in "
    r"[\d.e-]+s: '(\w+)'"
)
PERCENTILES = (50, 90, 99)


@dataclass
class Sample:
    """One submission: what the client saw when it posted, and the row as the API reports it."""

    index: int
    user: str
    sha256: str
    request_start: datetime
    post_s: float
    http_status: int | None
    refusal: str | None = None
    id: str | None = None
    status: str | None = None
    attempts: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    evaluation_s: float | None = None
    error_message: str | None = None

    @property
    def accepted(self) -> bool:
        return self.id is not None

    def spans(self) -> dict[str, float]:
        """Seconds between the client's POST start and the row's timestamps (scored rows only)."""
        created, started, finished = self.created_at, self.started_at, self.finished_at
        if self.status != "scored" or created is None or started is None or finished is None:
            return {}

        def span(a: datetime, b: datetime) -> float:
            return (b - a).total_seconds()

        spans = {
            "submit_to_scored": span(self.request_start, finished),
            "accept": span(self.request_start, created),
            "queue_wait": span(created, started),
            "worker_run": span(started, finished),
            "post_response": self.post_s,
        }
        if self.evaluation_s is not None:
            spans["evaluation"] = self.evaluation_s
        return spans


# ---------------------------------------------------------------------------------------------
# The deployment: broker, database, demo home and the students


@contextmanager
def infrastructure(database: str, scratch: Path) -> Iterator[tuple[dict[str, str], int]]:
    """A redis-server with an append-only file (production's setting) and, for ``postgres``, a
    PostgreSQL 15 cluster; yields the service settings that point at them and Redis's port."""
    with ExitStack() as stack:
        broker = stack.enter_context(redis_server(scratch / "redis", appendonly=True))
        settings = {"celery_broker_url": broker.url}
        if database == "postgres":
            settings["database_url"] = stack.enter_context(postgres_server()).url
        print(
            f"redis-server on port {broker.port}; database: "
            f"{settings.get('database_url', 'SQLite file in the home')}",
            flush=True,
        )
        yield settings, broker.port


def build_home(home: Path, env: dict[str, str]) -> dict[str, Any]:
    """Build (or reuse) the small demo course and lift the attack phase's submission limits."""
    started = time.perf_counter()
    _cli(env, "demo", "--build-only", "--eval-images", str(EVAL_IMAGES), *DEMO_TRAINING)
    print(f"demo course ready in {time.perf_counter() - started:.0f} s ({home})", flush=True)
    credentials: dict[str, Any] = json.loads((home / "demo-credentials.json").read_text())
    lift_limits(home / "assignments" / credentials["assignment"], credentials["attack_phase"])
    return credentials


def lift_limits(folder: Path, phase_id: str) -> None:
    """Rewrite the attack phase's ``limits`` so no daily or total quota refuses a bench upload."""
    path = folder / "assignment.toml"
    blocks = path.read_text(encoding="utf-8").split("[[phases]]")
    phase_block = next((i for i, b in enumerate(blocks) if f'id = "{phase_id}"' in b), None)
    if phase_block is None or not LIMITS_LINE.search(blocks[phase_block]):
        raise BenchError(f"no `limits = {{...}}` line for phase {phase_id!r} in {path}")
    blocks[phase_block] = LIMITS_LINE.sub(
        f"limits = {{ max_per_day = {NO_LIMIT_PER_DAY}, max_upload_mb = 16 }}",
        blocks[phase_block],
        count=1,
    )
    path.write_text("[[phases]]".join(blocks), encoding="utf-8")
    phase = load_assignment(folder).phase(phase_id)
    if phase is None or phase.track is not Track.ATTACK or phase.limits.max_total is not None:
        raise BenchError(f"phase {phase_id!r} in {path} still has a total limit")


def students(env: dict[str, str], credentials: dict[str, Any], count: int) -> list[tuple[str, str]]:
    """(username, token) of ``count`` students: the demo's, then new accounts."""
    pool = [(s["username"], s["token"]) for s in credentials["students"]][:count]
    while len(pool) < count:
        created = json.loads(_cli(env, "user", "add", f"bench-{uuid.uuid4().hex[:8]}"))
        pool.append((created["username"], created["token"]))
    return pool


# ---------------------------------------------------------------------------------------------
# Submitting and collecting


async def submit_all(
    http: httpx.AsyncClient,
    url: str,
    clean: np.ndarray,
    pool: list[tuple[str, str]],
    args: argparse.Namespace,
) -> list[Sample]:
    """POST ``args.submissions`` distinct batches, round-robin over the students: as fast as the
    API accepts them (``args.concurrency`` in flight), or at a steady ``args.rate`` per second."""
    gate = asyncio.Semaphore(args.concurrency)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(index: int) -> Sample:
        if args.rate > 0:
            await asyncio.sleep(max(0.0, start + index / args.rate - loop.time()))
        async with gate:
            username, token = pool[index % len(pool)]
            payload = make_batch(clean, args.seed + index)
            sample = Sample(
                index=index,
                user=username,
                sha256=hashlib.sha256(payload).hexdigest(),
                request_start=datetime.now(UTC),
                post_s=0.0,
                http_status=None,
            )
            t0 = time.perf_counter()
            try:
                response = await http.post(
                    url,
                    headers={"Authorization": f"Bearer {token}"},
                    files={"file": (f"adv-{index}.npy", payload, "application/octet-stream")},
                )
            except httpx.HTTPError as exc:
                sample.post_s = time.perf_counter() - t0
                sample.refusal = f"{type(exc).__name__}: {exc}"
                return sample
            sample.post_s = time.perf_counter() - t0
            sample.http_status = response.status_code
            if response.status_code in (200, 202):
                sample.id = response.json()["id"]
            else:
                sample.refusal = response.text[:300]
            return sample

    return list(await asyncio.gather(*(one(i) for i in range(args.submissions))))


async def wait_drained(
    http: httpx.AsyncClient, submitting: asyncio.Task[list[Sample]], args: argparse.Namespace
) -> bool:
    """Print the queue every ``args.poll_interval`` s until everything sent is final; False if
    ``args.timeout`` passed first. Reads `/health` (two counts), not every submission."""
    deadline: float | None = None
    while True:
        await asyncio.sleep(args.poll_interval)
        try:
            queue = (await http.get("/health")).json()["queues"]["cpu"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            print(f"  health: {exc!r}", flush=True)
            continue
        posted = "all posted" if submitting.done() else "posting"
        print(f"  {posted}; cpu queue: {queue['queued']} queued, {queue['running']} running")
        if submitting.done():
            if queue["queued"] == 0 and queue["running"] == 0:
                return True
            deadline = deadline or time.monotonic() + args.timeout
            if time.monotonic() > deadline:
                return False


async def collect(
    http: httpx.AsyncClient, samples: list[Sample], tokens: dict[str, str], concurrency: int
) -> None:
    """Fill each accepted sample from `GET /submissions/{id}` as its own student sees it."""
    gate = asyncio.Semaphore(concurrency)

    async def one(sample: Sample) -> None:
        async with gate:
            response = await http.get(
                f"/submissions/{sample.id}",
                headers={"Authorization": f"Bearer {tokens[sample.user]}"},
            )
        response.raise_for_status()
        row = response.json()
        sample.status, sample.attempts = row["status"], row["attempts"]
        sample.created_at = _parse_time(row["created_at"])
        sample.started_at = _parse_time(row["started_at"]) if row["started_at"] else None
        sample.finished_at = _parse_time(row["finished_at"]) if row["finished_at"] else None
        sample.error_message = row.get("error_message")
        if row.get("results"):
            sample.evaluation_s = float(row["results"]["evaluation_seconds"])

    await asyncio.gather(*(one(s) for s in samples if s.accepted))


async def clean_images(http: httpx.AsyncClient, phase_url: str, token: str) -> np.ndarray:
    """The phase's clean images, downloaded as a student does; the demo must hold
    ``EVAL_IMAGES`` of them."""
    download = await http.get(
        f"{phase_url}/dataset",
        params={"format": "npz"},
        headers={"Authorization": f"Bearer {token}"},
    )
    download.raise_for_status()
    clean: np.ndarray = np.load(io.BytesIO(download.content))["images"]
    if clean.shape[0] != EVAL_IMAGES:
        raise BenchError(
            f"the demo holds {clean.shape[0]} images, not {EVAL_IMAGES}; use another --home"
        )
    return clean


async def drive(
    base: str, phase_url: str, pool: list[tuple[str, str]], args: argparse.Namespace
) -> tuple[list[Sample], bool, float]:
    """Download the clean images, submit, wait for the queue to drain and read every row back.
    Returns the samples, whether the queue drained in time, and the wall time to drain."""
    async with httpx.AsyncClient(base_url=base, timeout=120.0) as http:
        clean = await clean_images(http, phase_url, pool[0][1])
        started = time.perf_counter()
        submitting = asyncio.create_task(
            submit_all(http, f"{phase_url}/submissions", clean, pool, args)
        )
        drained = await wait_drained(http, submitting, args)
        drain_s = time.perf_counter() - started
        samples = await submitting
        await collect(http, samples, dict(pool), args.concurrency)
    return samples, drained, drain_s


# ---------------------------------------------------------------------------------------------
# Figures


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {}
    figures = {f"p{q}": float(np.percentile(array, q)) for q in PERCENTILES}
    return {**figures, "max": float(array.max()), "mean": float(array.mean())}


def broker_leftovers(port: int) -> dict[str, int]:
    """Messages still in Redis per kombu queue list, and unacknowledged ones."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        left = {
            key.decode(): int(client.llen(key))
            for key in client.scan_iter()
            if client.type(key) == b"list"
        }
        left["unacked"] = int(client.hlen("unacked"))
        return left
    finally:
        client.close()


def log_counts(log: Path) -> dict[str, Any]:
    """Task runs per pool process and outcome, and the supervisor's sweep re-sends, from the
    service log: a run that ends ``skipped`` is a duplicate delivery the claim turned away."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    runs = Counter(TASK_LINE.findall(text))
    by_outcome: Counter[str] = Counter()
    for (_, outcome), n in runs.items():
        by_outcome[outcome] += n
    sweeps = [tuple(int(n) for n in m) for m in SWEEP_LINE.findall(text)]
    return {
        "task_runs": {f"{proc} {outcome}": n for (proc, outcome), n in sorted(runs.items())},
        "task_runs_by_outcome": dict(by_outcome),
        "sweep_requeued": sum(s[0] for s in sweeps),
        "sweep_failed": sum(s[1] for s in sweeps),
        "sweep_sent": sum(s[2] for s in sweeps),
    }


ROWS = {  # span key: label
    "submit_to_scored": "submit-to-scored (POST start -> finished_at)",
    "accept": "  POST start -> row committed (created_at)",
    "queue_wait": "  queue wait (created_at -> started_at)",
    "worker_run": "  worker run (started_at -> finished_at)",
    "evaluation": "    model evaluation (evaluation_seconds)",
    "post_response": "POST round trip (202 received)",
}


def summarize(samples: list[Sample], drained: bool) -> dict[str, Any]:
    accepted = [s for s in samples if s.accepted]
    scored = [s for s in accepted if s.status == "scored"]
    spans = [s.spans() for s in scored]
    first_start = min(s.request_start for s in samples)
    finishes = sorted(s.finished_at for s in scored if s.finished_at)
    run_s = (finishes[-1] - first_start).total_seconds() if finishes else float("nan")
    steady: float | None = None
    if len(finishes) >= 20:  # the middle 80 % of finishes, without start-up and tail
        low, high = finishes[len(finishes) // 10], finishes[(9 * len(finishes)) // 10]
        steady = (9 * len(finishes) // 10 - len(finishes) // 10) / (high - low).total_seconds()
    last_post = max(
        (s.request_start.timestamp() + s.post_s for s in samples), default=first_start.timestamp()
    )
    not_scored = [s for s in accepted if s.status != "scored"]
    return {
        "posted": len(samples),
        "accepted": len(accepted),
        "reused": sum(1 for s in accepted if s.http_status == 200),
        "refused": [
            {"index": s.index, "http_status": s.http_status, "reason": s.refusal}
            for s in samples
            if not s.accepted
        ],
        "distinct_files": len({s.sha256 for s in samples}),
        "statuses": dict(Counter(str(s.status) for s in accepted)),
        "scored": len(scored),
        "lost": len(not_scored),
        "unfinished": sum(1 for s in not_scored if s.status not in FINAL_STATES),
        "lost_detail": [
            {"id": s.id, "status": s.status, "attempts": s.attempts, "reason": s.error_message}
            for s in not_scored
        ],
        "failure_reasons": dict(
            Counter(f"{s.status}: {s.error_message or 'no reason given'}" for s in not_scored)
        ),
        "attempts_over_1": sum(1 for s in accepted if (s.attempts or 0) > 1),
        "drained_before_timeout": drained,
        "run_s": run_s,
        "submit_phase_s": last_post - first_start.timestamp(),
        "throughput_per_s": len(scored) / run_s if finishes else 0.0,
        "throughput_middle_80_per_s": steady,
        "spans_s": {key: percentiles([s[key] for s in spans if key in s]) for key in ROWS},
    }


def print_summary(summary: dict[str, Any], logged: dict[str, Any], cpu: dict[str, float]) -> None:
    print(f"\n{'posted':34} {summary['posted']}")
    print(
        f"{'accepted (202; 200 if reused)':34} {summary['accepted']} ({summary['reused']} reused)"
    )
    print(f"{'distinct files':34} {summary['distinct_files']}")
    print(f"{'scored':34} {summary['scored']}")
    print(f"{'LOST (accepted, not scored)':34} {summary['lost']}  {summary['statuses']}")
    for reason, n in summary["failure_reasons"].items():
        print(f"  {n} x {reason}")
    print(f"{'attempts > 1':34} {summary['attempts_over_1']}")
    print(f"{'task runs (service log)':34} {logged['task_runs_by_outcome']}")
    print(f"{'  per pool process':34} {logged['task_runs']}")
    print(f"{'sweeper re-sends / requeues':34} {logged['sweep_sent']} / {logged['sweep_requeued']}")
    print(f"{'posting took':34} {summary['submit_phase_s']:.1f} s")
    print(f"{'first POST -> last finished_at':34} {summary['run_s']:.1f} s")
    print(f"{'THROUGHPUT, whole run':34} {summary['throughput_per_s']:.2f} scored/s")
    if summary["throughput_middle_80_per_s"] is not None:
        print(
            f"{'  middle 80 % of finishes':34} {summary['throughput_middle_80_per_s']:.2f} scored/s"
        )
    print(f"\n{'seconds, scored submissions':48} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for key, label in ROWS.items():
        s = summary["spans_s"].get(key)
        if s:
            print(f"{label:48} {s['p50']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f} {s['max']:8.3f}")
    print("CPU seconds over the run: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())))


# ---------------------------------------------------------------------------------------------


def _tree() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--short").splitlines(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tree = _tree()  # the service imports the working tree as it is now
    temporary = args.home is None
    home = Path(args.home or tempfile.mkdtemp(prefix="autograder-queue-bench-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="autograder-queue-bench-servers-"))
    port = free_port()
    marker = uuid.uuid4().hex
    try:
        with infrastructure(args.database, scratch) as (servers, redis_port):
            settings = {**SERVICE_SETTINGS, **args.setting, **servers}
            env = {**_service_env(home, port, settings), MARKER_VARIABLE: marker}
            credentials = build_home(home, env)
            pool = students(env, credentials, args.students)
            phase_url = (
                f"/assignments/{credentials['assignment']}/phases/{credentials['attack_phase']}"
            )
            base = f"http://127.0.0.1:{port}/api/v1"
            log = home / f"bench-queue-{marker[:8]}.log"
            service = Service(env, log)
            try:
                with httpx.Client(base_url=base, timeout=30.0) as http:
                    health = service.wait_healthy(http)
                print(
                    f"service healthy on port {port}: "
                    f"worker(s) {[w['hostname'] for w in health['workers']]}, "
                    f"{settings['worker_concurrency']} pool process(es), queues "
                    f"{settings['worker_queues']}; {len(pool)} students; "
                    + (f"{args.rate}/s" if args.rate else "burst")
                    + f", {args.submissions} submissions",
                    flush=True,
                )
                load_before = os.getloadavg()
                cpu_before, marks = service.cpu_seconds(), _cpu_marks(service)
                samples, drained, drain_s = asyncio.run(drive(base, phase_url, pool, args))
                others = _others_share(marks, _cpu_marks(service))
                cpu_after, load_after = service.cpu_seconds(), os.getloadavg()
                left_in_broker = broker_leftovers(redis_port)
            finally:
                code = service.stop()
                left = marked_processes(marker)
                for pid in left:  # started by this run's `autograder up`, identified by marker
                    os.kill(pid, signal.SIGKILL)
                print(f"service stopped (exit code {code}; {len(left)} leftover processes)")
            logged = log_counts(log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if temporary and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    summary = summarize(samples, drained)
    cpu = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
    print_summary(summary, logged, cpu)
    print(f"other processes used {others:.0%} of the machine's CPU during the run")
    print(f"left in Redis at the end: {left_in_broker}")
    return {
        "benchmark": "queue_throughput",
        "recorded_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "tree": tree,
        "setup": {
            "database": args.database,
            "broker": "redis-server (appendonly yes)",
            "eval_images": EVAL_IMAGES,
            "hidden_models": 3,
            "demo_training": " ".join(DEMO_TRAINING),
            "submissions": args.submissions,
            "students": [u for u, _ in pool],
            "rate_per_s": args.rate or "burst",
            "concurrency": args.concurrency,
            "service_settings": {
                k: v for k, v in settings.items() if k not in ("database_url", "celery_broker_url")
            },
            "batch": "uint8 .npy, clean images plus uniform noise in [-8, 8], one seed each",
        },
        "machine": machine(settings),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "others_cpu_share": others,
        "cpu_seconds": cpu,
        "drain_wall_s": drain_s,
        "broker_left": left_in_broker,
        "service_log": logged,
        "summary": summary,
        "samples": [asdict(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--students", type=int, default=10, help="accounts to spread them over")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="submissions per second (default: a burst)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="POSTs in flight at most")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first batch")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="seconds between checks")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait after the last POST"
    )
    add_deployment_options(parser, settings=SERVICE_SETTINGS, results=RESULTS)
    args = parser.parse_args(argv)
    args.setting = dict(args.setting)
    if args.submissions < 1 or args.students < 1 or args.concurrency < 1 or args.rate < 0:
        parser.error("--submissions, --students and --concurrency must be at least 1, --rate >= 0")
    try:
        report = run(args)
    except (BenchError, pytest.fail.Exception, pytest.skip.Exception) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    summary = report["summary"]
    if summary["lost"] or summary["refused"]:
        print(f"FAILED: {summary['lost']} lost, {len(summary['refused'])} refused", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
