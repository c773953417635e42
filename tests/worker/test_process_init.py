"""A grading pool process, as Celery forks it: the configured torch threads and niceness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = (
    "import os, torch; from worker.tasks import _init_process; before = os.nice(0); "
    "_init_process(); print(os.nice(0) - before, torch.get_num_threads())"
)


def init_process(**variables: str) -> tuple[int, int]:
    """How much ``_init_process`` raised the niceness by, and torch's threads after it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGRADER_")}
    env |= {**variables, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    niceness, threads = result.stdout.split()
    return int(niceness), int(threads)


def test_pool_processes_grade_at_the_configured_niceness_and_threads() -> None:
    assert init_process(AUTOGRADER_WORKER_NICE="7", AUTOGRADER_TORCH_THREADS="1") == (7, 1)
    assert init_process(AUTOGRADER_WORKER_NICE="0", AUTOGRADER_TORCH_THREADS="2") == (0, 2)


def test_by_default_grading_yields_to_the_api() -> None:
    assert init_process()[0] == 10
