# The two commands a new user needs: `make demo` runs the service, `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-defense bench-queue bench-load clean-demo

# torchattacks is the independent reference the defense suite is checked against
# (tests/graders/attacks/test_reference.py, bench/defense_suite.py). It goes in with --no-deps:
# its metadata pins requests~=2.25.1, which conflicts with the lock's idna 3.x, yet it never
# imports requests, and tqdm only optionally. The one import it needs, scipy, is in the dev extra.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps torchattacks==3.5.1
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/autograder demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check server worker graders tests bench
	$(BIN)/mypy server worker graders

bench: $(STAMP)
	$(BIN)/python bench/attack_phase.py

# CPU-sized counts (about 15 minutes on 2 cores); on a GPU pass AutoAttack's own with
# `make bench-defense BENCH_DEFENSE_ARGS="--iterations 100 --square-queries 5000"`.
BENCH_DEFENSE_ARGS ?= --points 200 --iterations 10 --square-queries 200
bench-defense: $(STAMP)
	$(BIN)/python bench/defense_suite.py $(BENCH_DEFENSE_ARGS)

# 1,000 attack submissions through a throw-away redis-server and PostgreSQL 15, two worker processes
# (about 5 minutes on 2 idle cores); `BENCH_QUEUE_ARGS="--database sqlite"` keeps SQLite instead.
BENCH_QUEUE_ARGS ?=
bench-queue: $(STAMP)
	$(BIN)/python -m bench.queue_throughput $(BENCH_QUEUE_ARGS)

# 200 students through the last 10 minutes before a deadline, then 60 s of uploads at 50/s, against
# the same deployment with the rate limits on (40 to 60 minutes on 2 cores, most of it scoring the
# backlog); `BENCH_LOAD_ARGS="--minutes 2 --burst-seconds 20"` is a quick run.
BENCH_LOAD_ARGS ?=
bench-load: $(STAMP)
	$(BIN)/python -m bench.deadline_load $(BENCH_LOAD_ARGS)

clean-demo:
	rm -rf .autograder
