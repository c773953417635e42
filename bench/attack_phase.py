"""Attack-phase grading benchmark: submit-to-scored latency of the running service and its overhead.

Builds (or reuses) a demo course with 500 evaluation images and 3 hidden ResNet-20 models, starts
`autograder up` on a free port, and times sequential submissions end to end through the HTTP API.
See docs/benchmarks.md for the figures and bench/README.md for how to run it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "attack_phase.json"
SERVICE_SETTINGS = {"rate_limits": "false"}
"""One student uploads back to back; the rate limits would refuse that."""
EVAL_IMAGES = 500
EPS = 8
# Timing does not depend on how well the hidden models are trained: train them briefly.
DEMO_TRAINING = ("--train-per-class", "20", "--epochs", "1", "--seconds-per-model", "5")
TARGET_P50_S = 2.0
TARGET_OVERHEAD = 0.10
QUIET_SHARE = 0.10  # a submission is "quiet" when other processes used less of the machine
FINAL_STATES = {"scored", "failed", "cancelled"}
# Variables that would point the service away from the benchmark's own home.
FOREIGN_ENV = ("DATABASE_URL", "CELERY_BROKER_URL")
PACKAGES = ("torch", "numpy", "fastapi", "uvicorn", "celery", "kombu", "sqlalchemy", "httpx")


class BenchError(Exception):
    """The benchmark could not run (build, start-up or a submission failed)."""


@dataclass
class Sample:
    """One submission's timings: client clocks, the row's timestamps and the grader's report."""

    id: str
    user: str
    request_start: datetime
    post_s: float
    client_s: float
    polls: int
    created_at: datetime
    started_at: datetime
    finished_at: datetime
    seen_at: datetime
    evaluation_s: float
    model_s: dict[str, float]
    enqueued_at: datetime | None = None
    others_cpu_share: float | None = None
    derived: dict[str, float] = field(default_factory=dict)

    def derive(self) -> None:
        """The stages between the timestamps, in seconds."""

        def span(a: datetime, b: datetime) -> float:
            return (b - a).total_seconds()

        d = {
            "client": self.client_s,
            "post_response": self.post_s,
            "submit_to_finished": span(self.request_start, self.finished_at),
            "server_row": span(self.created_at, self.finished_at),
            "upload_validation": span(self.request_start, self.created_at),
            "queue_wait": span(self.created_at, self.started_at),
            "worker_run": span(self.started_at, self.finished_at),
            "evaluation": self.evaluation_s,
            "worker_other": span(self.started_at, self.finished_at) - self.evaluation_s,
            "finish_to_seen": span(self.finished_at, self.seen_at),
        }
        if self.enqueued_at is not None:
            d["enqueue"] = span(self.created_at, self.enqueued_at)
            d["broker_pickup"] = span(self.enqueued_at, self.started_at)
        d["overhead_share_submit"] = 1.0 - self.evaluation_s / d["submit_to_finished"]
        d["overhead_share_row"] = 1.0 - self.evaluation_s / d["server_row"]
        d["overhead_share_client"] = 1.0 - self.evaluation_s / d["client"]
        if self.others_cpu_share is not None:
            d["others_cpu_share"] = self.others_cpu_share
        self.derived = d


def _parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service_env(home: Path, port: int, settings: dict[str, str]) -> dict[str, str]:
    """The service's environment: only the benchmark's home, port and ``--setting`` values."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AUTOGRADER_") and k not in FOREIGN_ENV
    }
    env.update({f"AUTOGRADER_{name.upper()}": value for name, value in settings.items()})
    env.update(
        AUTOGRADER_HOME=str(home),
        AUTOGRADER_ASSIGNMENTS_DIR=str(home / "assignments"),
        AUTOGRADER_PORT=str(port),
        PYTHONPATH=str(REPO),
    )
    return env


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"autograder {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def build_home(home: Path, env: dict[str, str]) -> dict[str, Any]:
    """Build the demo course in ``home`` (or reuse it) and return its credentials."""
    started = time.perf_counter()
    output = _cli(env, "demo", "--build-only", "--eval-images", str(EVAL_IMAGES), *DEMO_TRAINING)
    reused = "reusing the demo course" in output
    print(
        f"demo course {'reused' if reused else 'built'} in {time.perf_counter() - started:.0f} s"
        f" ({home})",
        flush=True,
    )
    credentials: dict[str, Any] = json.loads((home / "demo-credentials.json").read_text())
    return credentials


class Service:
    """`autograder up` as a child process, stopped with SIGINT like an operator's Ctrl-C."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "up"],
            env=env,
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_healthy(self, http: httpx.Client, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"`autograder up` exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                response = http.get("/health")
                last = response.json()
                if response.status_code == 200 and last.get("status") == "ok":
                    return dict(last)
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise BenchError(
            f"service not healthy after {timeout:.0f} s (last: {last}); see {self.log_path}"
        )

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far of the supervisor and its descendants, by role."""
        totals: dict[str, float] = {}
        ticks = os.sysconf("SC_CLK_TCK")
        pending = [self.process.pid]
        while pending:
            pid = pending.pop()
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            fields = stat.rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            role = (
                "api"
                if b"uvicorn" in cmdline
                else "worker"
                if b"celery" in cmdline
                else "supervisor"
                if pid == self.process.pid
                else "other"
            )
            totals[role] = totals.get(role, 0.0) + seconds
        return totals

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"warning: `autograder up` (pid {self.process.pid}) ignored SIGINT for "
                    f"{timeout:.0f} s; sending SIGTERM",
                    file=sys.stderr,
                )
                self.process.terminate()
                self.process.wait(timeout)
        self.log.close()
        return self.process.returncode


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_marks(service: Service) -> tuple[float, float, float]:
    """(wall clock, machine busy CPU s, CPU s of the service and this benchmark) right now."""
    ours = sum(service.cpu_seconds().values()) + time.process_time()
    return time.perf_counter(), _busy_seconds(), ours


def _others_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Share of the machine's CPU that processes other than ours used between two marks."""
    wall, busy, ours = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, busy - ours) / (wall * (os.cpu_count() or 1))


class Students:
    """Student tokens with submissions left today; creates another student when all are spent."""

    def __init__(
        self,
        http: httpx.Client,
        env: dict[str, str],
        quota_url: str,
        students: list[dict[str, str]],
    ) -> None:
        self.http, self.env, self.quota_url = http, env, quota_url
        self.pool = [(s["username"], s["token"]) for s in students]
        self.left: dict[str, int] = {}

    def _remaining(self, token: str) -> int:
        response = self.http.get(self.quota_url, headers={"Authorization": f"Bearer {token}"})
        response.raise_for_status()
        q = response.json()
        left = [
            q["max_per_day"] - q["used_today"] if q["max_per_day"] is not None else 10**9,
            q["max_total"] - q["used_total"] if q["max_total"] is not None else 10**9,
        ]
        return max(0, min(left))

    def any_token(self) -> str:
        return self.pool[0][1]

    def next(self) -> tuple[str, str]:
        for username, token in self.pool:
            if username not in self.left:
                self.left[username] = self._remaining(token)
            if self.left[username] > 0:
                self.left[username] -= 1
                return username, token
        created = json.loads(_cli(self.env, "user", "add", f"bench-{uuid.uuid4().hex[:8]}"))
        self.pool.append((created["username"], created["token"]))
        return self.next()


def make_batch(clean: np.ndarray, seed: int) -> bytes:
    """A valid .npy batch: the clean images plus uniform noise in [-eps, eps], clipped."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-EPS, EPS + 1, size=clean.shape, dtype=np.int16)
    adversarial = np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, adversarial, allow_pickle=False)
    return buffer.getvalue()


def submit_and_wait(
    http: httpx.Client,
    url: str,
    user: tuple[str, str],
    payload: bytes,
    poll_s: float,
    timeout: float = 300.0,
) -> Sample:
    """POST one batch, poll until it is final, and return its timings."""
    headers = {"Authorization": f"Bearer {user[1]}"}
    request_start = datetime.now(UTC)
    t0 = time.perf_counter()
    response = http.post(
        url, headers=headers, files={"file": ("adv.npy", payload, "application/octet-stream")}
    )
    post_s = time.perf_counter() - t0
    if response.status_code != 202:
        raise BenchError(f"submission refused: HTTP {response.status_code} {response.text[:500]}")
    submission = response.json()
    polls = 0
    while submission["status"] not in FINAL_STATES:
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"submission {submission['id']} not final after {timeout:.0f} s")
        time.sleep(poll_s)
        polls += 1
        got = http.get(f"/submissions/{submission['id']}", headers=headers)
        got.raise_for_status()
        submission = got.json()
    client_s = time.perf_counter() - t0
    seen_at = datetime.now(UTC)
    if submission["status"] != "scored":
        raise BenchError(
            f"submission {submission['id']} {submission['status']}: "
            f"{submission.get('error_message')}"
        )
    results = submission["results"]
    return Sample(
        id=submission["id"],
        user=user[0],
        request_start=request_start,
        post_s=post_s,
        client_s=client_s,
        polls=polls,
        created_at=_parse_time(submission["created_at"]),
        started_at=_parse_time(submission["started_at"]),
        finished_at=_parse_time(submission["finished_at"]),
        seen_at=seen_at,
        evaluation_s=float(results["evaluation_seconds"]),
        model_s={m["name"]: float(m["seconds"]) for m in results["models"]},
    )


def add_enqueued_at(samples: list[Sample], home: Path) -> None:
    """Read ``enqueued_at`` (not in the API view) from the embedded SQLite database, read-only."""
    database = home / "autograder.db"
    if not database.is_file() or not samples:
        return
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        marks = ",".join("?" * len(samples))
        rows = dict(
            connection.execute(
                f"SELECT id, enqueued_at FROM submission WHERE id IN ({marks})",
                [s.id for s in samples],
            ).fetchall()
        )
    for sample in samples:
        if rows.get(sample.id):
            sample.enqueued_at = _parse_time(rows[sample.id])


def _percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
        "mean": float(array.mean()),
        "min": float(array.min()),
    }


def summarize(samples: list[Sample]) -> dict[str, dict[str, float]]:
    keys = list(samples[0].derived)
    summary = {k: _percentiles([s.derived[k] for s in samples]) for k in keys}
    for name in samples[0].model_s:
        summary[f"model:{name}"] = _percentiles([s.model_s[name] for s in samples])
    return summary


def machine(settings: dict[str, str]) -> dict[str, Any]:
    import torch

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads_default": torch.get_num_threads(),
        "worker_torch_threads": int(settings.get("torch_threads") or torch.get_num_threads()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


ROWS = (  # key in the summary, label
    ("client", "client: POST start -> poll sees scored"),
    ("submit_to_finished", "server: POST start -> finished_at"),
    ("server_row", "server: created_at -> finished_at"),
    ("upload_validation", "  upload + validation (POST start -> created_at)"),
    ("queue_wait", "  queue wait (created_at -> started_at)"),
    ("enqueue", "    enqueue (created_at -> enqueued_at)"),
    ("broker_pickup", "    broker pickup (enqueued_at -> started_at)"),
    ("worker_run", "  worker run (started_at -> finished_at)"),
    ("evaluation", "    model evaluation (evaluation_seconds)"),
    ("worker_other", "    worker other (run - evaluation)"),
    ("finish_to_seen", "  finished_at -> poll sees it"),
    ("post_response", "POST round trip (202 received)"),
)


def print_table(summary: dict[str, dict[str, float]], n: int) -> None:
    print(f"\n{n} warm submissions, seconds (p95 interpolated):")
    print(f"{'stage':52} {'p50':>7} {'p95':>7} {'max':>7}")
    for key, label in ROWS:
        if key in summary:
            s = summary[key]
            print(f"{label:52} {s['p50']:7.3f} {s['p95']:7.3f} {s['max']:7.3f}")
    for key in (k for k in summary if k.startswith("model:")):
        s = summary[key]
        label = f"    {key[6:]} (per-model seconds)"
        print(f"{label:52} {s['p50']:7.3f} {s['p95']:7.3f} {s['max']:7.3f}")
    print("overhead share = 1 - evaluation / latency (p50 of per-submission ratios):")
    for key, label in (
        ("overhead_share_submit", "POST start -> finished_at"),
        ("overhead_share_row", "created_at -> finished_at"),
        ("overhead_share_client", "client latency"),
    ):
        print(f"  {label:50} {summary[key]['p50']:7.1%}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    temporary = args.home is None
    home = Path(args.home or tempfile.mkdtemp(prefix="autograder-bench-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = _service_env(home, port, args.setting)
    try:
        credentials = build_home(home, env)
        base = f"http://127.0.0.1:{port}/api/v1"
        phase_url = f"/assignments/{credentials['assignment']}/phases/{credentials['attack_phase']}"
        service = Service(env, home / "bench-service.log")
        try:
            with httpx.Client(base_url=base, timeout=120.0) as http:
                health = service.wait_healthy(http)
                print(
                    f"service healthy on port {port}: {len(health['workers'])} worker(s)",
                    flush=True,
                )
                students = Students(http, env, f"{phase_url}/quota", credentials["students"])
                download = http.get(
                    f"{phase_url}/dataset",
                    params={"format": "npz"},
                    headers={"Authorization": f"Bearer {students.any_token()}"},
                )
                download.raise_for_status()
                clean = np.load(io.BytesIO(download.content))["images"]
                if clean.shape != (EVAL_IMAGES, 32, 32, 3):
                    raise BenchError(
                        f"{home} holds a demo with {clean.shape[0]} images, not "
                        f"{EVAL_IMAGES}; use another --home"
                    )
                submit_url = f"{phase_url}/submissions"
                load_before = os.getloadavg()
                warmup = []
                for i in range(args.warmup):
                    sample = submit_and_wait(
                        http,
                        submit_url,
                        students.next(),
                        make_batch(clean, 10_000 + i),
                        args.poll_interval,
                    )
                    warmup.append(sample)
                    print(f"warm-up {i + 1}/{args.warmup}: {sample.client_s:.3f} s", flush=True)
                samples = []
                cpu_before, client_before = service.cpu_seconds(), time.process_time()
                loop_started = time.perf_counter()
                for i in range(args.submissions):
                    payload, user = make_batch(clean, i), students.next()
                    marks = _cpu_marks(service)
                    sample = submit_and_wait(http, submit_url, user, payload, args.poll_interval)
                    sample.others_cpu_share = _others_share(marks, _cpu_marks(service))
                    samples.append(sample)
                    print(
                        f"submission {i + 1}/{args.submissions}: {sample.client_s:.3f} s "
                        f"(evaluation {sample.evaluation_s:.3f} s, other processes "
                        f"{sample.others_cpu_share:.0%} of the CPU)",
                        flush=True,
                    )
                loop_s = time.perf_counter() - loop_started
                cpu_after, client_after = service.cpu_seconds(), time.process_time()
                load_after = os.getloadavg()
                cpu = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
                cpu["bench_client"] = client_after - client_before
        finally:
            code = service.stop()
            print(f"service stopped (exit code {code})", flush=True)
        add_enqueued_at(warmup + samples, home)
        for sample in warmup + samples:
            sample.derive()
    finally:
        if temporary and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    summary = summarize(samples)
    quiet = [s for s in samples if (s.others_cpu_share or 0.0) < QUIET_SHARE]
    quiet_summary = summarize(quiet) if quiet else {}
    targets: dict[str, dict[str, Any]] = {
        "p50_client_s": {
            "target": TARGET_P50_S,
            "value": summary["client"]["p50"],
            "met": summary["client"]["p50"] < TARGET_P50_S,
        },
        "overhead_share": {
            "target": TARGET_OVERHEAD,
            "value": summary["overhead_share_submit"]["p50"],
            "basis": "p50 of 1 - evaluation_seconds / (finished_at - POST start)",
            "met": summary["overhead_share_submit"]["p50"] < TARGET_OVERHEAD,
        },
    }
    print_table(summary, len(samples))
    print(
        f"CPU seconds over the {loop_s:.1f} s timed loop: "
        + ", ".join(f"{role} {seconds:.1f}" for role, seconds in sorted(cpu.items()))
    )
    print(
        f"other processes used {summary['others_cpu_share']['p50']:.0%} of the CPU (p50); "
        f"{len(quiet)} submissions ran while they used < {QUIET_SHARE:.0%}",
        end="",
    )
    if quiet:
        print(
            f": client p50 {quiet_summary['client']['p50']:.3f} s, "
            f"p95 {quiet_summary['client']['p95']:.3f} s, overhead share "
            f"{quiet_summary['overhead_share_submit']['p50']:.1%}"
        )
    else:
        print()
    for name, t in targets.items():
        print(
            f"target {name} < {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['value']:.3f})"
        )
    return {
        "benchmark": "attack_phase",
        "recorded_at": datetime.now(UTC).isoformat(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "setup": {
            "eval_images": EVAL_IMAGES,
            "hidden_models": 3,
            "submissions": args.submissions,
            "warmup": args.warmup,
            "poll_interval_s": args.poll_interval,
            "demo_training": " ".join(DEMO_TRAINING),
            "batch": "uint8 .npy, uniform noise eps 8",
            "home": str(home) if not temporary or args.keep else None,
            "service_settings": args.setting,
        },
        "machine": machine(args.setting),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "cpu_seconds_timed_loop": {"wall_s": loop_s, **cpu},
        "targets": targets,
        "summary_s": summary,
        "quiet": {
            "others_cpu_share_below": QUIET_SHARE,
            "count": len(quiet),
            "summary_s": quiet_summary,
        },
        "warmup_s": [s.derived for s in warmup],
        "samples": [
            {**{k: v for k, v in asdict(s).items() if k != "derived"}, "derived": s.derived}
            for s in samples
        ],
    }


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (a Settings field), got {text!r}")
    return name.lower(), value


def add_deployment_options(
    parser: argparse.ArgumentParser, *, settings: dict[str, str], results: Path
) -> None:
    """The options of a benchmark that runs the service: the demo home, keeping it, service
    settings on top of ``settings``, and the results file (default ``results``)."""
    parser.add_argument(
        "--home", type=Path, help="demo home to build or reuse (default: temporary)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument(
        "--setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a service setting on top of " + ", ".join(f"{k}={v}" for k, v in settings.items()),
    )
    parser.add_argument("--out", type=Path, default=results, help="JSON results file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=30, help="timed submissions")
    parser.add_argument("--warmup", type=int, default=3, help="untimed submissions first")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.025,
        help="seconds between status polls (default 0.025)",
    )
    add_deployment_options(parser, settings=SERVICE_SETTINGS, results=RESULTS)
    args = parser.parse_args(argv)
    args.setting = {**SERVICE_SETTINGS, **dict(args.setting)}
    if args.submissions < 1 or args.warmup < 0:
        parser.error("--submissions must be at least 1 and --warmup at least 0")
    try:
        report = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
