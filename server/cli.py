"""The `autograder` command: run the service, manage the course, build data sets, and submit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from server.config import Settings, get_settings


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The environment's settings, with the command line's --host/--port on top."""
    for name in ("host", "port"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    return Settings(**overrides) if overrides else get_settings()


def cmd_up(args: argparse.Namespace) -> int:
    from server.supervisor import up

    return up(_settings(args), worker=not args.no_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from server.supervisor import worker_command

    command = worker_command(get_settings(), name=args.name)
    os.execv(command[0], command)
    return 1  # not reached


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from server.migrations import upgrade

    upgrade(get_settings().db_url)
    print("database schema is up to date")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import DemoOptions, build_demo
    from server.supervisor import up

    settings = _settings(args, assignments_dir=get_settings().home / "assignments")
    options = DemoOptions(
        **{k: v for k, v in vars(args).items() if k in DemoOptions.__dataclass_fields__ and v}
    )
    credentials = build_demo(settings, options, rebuild=args.rebuild)
    path = settings.home / "demo-credentials.json"
    print(f"\nDemo course ready. Credentials written to {path}:")
    print(f"  URL:        {credentials['base_url']}  (API docs: {credentials['base_url']}/docs)")
    print(f"  log in at:  {credentials['login_url']}")
    for role, account in [("TA", credentials["ta"])] + [
        ("student", student) for student in credentials["students"]
    ]:
        print(
            f"  {role + ':':<11} {account['username']}  password {account['password']}  "
            f"token {account['token']}"
        )
    print(f"  assignment: {credentials['assignment']}, attack phase: {credentials['attack_phase']}")
    print(
        "\nSubmit as alice:  export AUTOGRADER_URL=... AUTOGRADER_TOKEN=...; "
        "autograder submit demo attack adv.zip --wait\n"
    )
    if args.build_only:
        return 0
    return up(settings)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Requeue what dead workers left running, and send what the broker missed when it was down."""
    import time

    from server.db import session_factory_for
    from server.queue import sweep

    settings = get_settings()
    factory = session_factory_for(settings.db_url)
    while True:
        try:
            with factory() as session:
                report = sweep(session, settings)
            if report.requeued or report.failed or report.sent or args.every is None:
                print(f"sweep: {report}", flush=True)
        except Exception as exc:  # the database may be restarting; try again next round
            print(f"sweep: failed ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            if args.every is None:
                return 1
        if args.every is None:
            return 0
        time.sleep(args.every)


def cmd_user_add(args: argparse.Namespace) -> int:
    from server.db import session_factory_for
    from server.migrations import upgrade
    from server.models import Role
    from server.security import WeakPassword, create_user, issue_token, set_password

    settings = get_settings()
    upgrade(settings.db_url)
    with session_factory_for(settings.db_url)() as session:
        user = create_user(
            session, username=args.username, role=Role(args.role), pseudonym=args.pseudonym
        )
        if args.password is not None:
            try:
                set_password(user, args.password)
            except WeakPassword as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        token = issue_token(session, user=user, secret_key=settings.secret_key)
        session.commit()
    print(json.dumps({"username": args.username, "role": args.role, "token": token}))
    return 0


def cmd_user_password(args: argparse.Namespace) -> int:
    import getpass

    from sqlalchemy import select

    from server.db import session_factory_for
    from server.models import User
    from server.security import WeakPassword, set_password

    password = args.password
    if password is None:
        password = getpass.getpass(f"new password for {args.username}: ")
    settings = get_settings()
    with session_factory_for(settings.db_url)() as session:
        user = session.scalar(select(User).where(User.username == args.username))
        if user is None:
            print(f"error: no user {args.username!r}", file=sys.stderr)
            return 1
        try:
            set_password(user, password)
        except WeakPassword as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        session.commit()
    print(f"password set for {args.username}; they can log in at {settings.public_url}/login")
    return 0


def cmd_roster_import(args: argparse.Namespace) -> int:
    import csv

    from server.db import session_factory_for
    from server.errors import ServiceError
    from server.migrations import upgrade
    from server.services.accounts import import_roster

    settings = get_settings()
    upgrade(settings.db_url)
    with session_factory_for(settings.db_url)() as session:
        try:
            imported = import_roster(
                session,
                actor=None,
                content=args.file.read_bytes(),
                secret_key=settings.secret_key,
                lifetime_s=settings.invitation_lifetime_s,
                reissue=args.reissue,
            )
        except ServiceError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    out = args.out.open("w", newline="", encoding="utf-8") if args.out else sys.stdout
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["student_id", "name", "email", "invitation_code", "invite_url"])
    for entry in imported:
        url = f"{settings.public_url}/invite?code={entry.invitation_code}"
        writer.writerow(
            [entry.student_id, entry.name, entry.email, entry.invitation_code or ""]
            + [url if entry.invitation_code else ""]
        )
    if args.out:
        out.close()
        args.out.chmod(0o600)
    created = sum(entry.created for entry in imported)
    codes = sum(entry.invitation_code is not None for entry in imported)
    days = settings.invitation_lifetime_s / 86400
    print(
        f"{len(imported)} students ({created} new); {codes} invitation codes, valid {days:g} "
        "days" + (f", written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from server.db import session_factory_for
    from server.models import User
    from server.security import issue_token, revoke_tokens

    settings = get_settings()
    with session_factory_for(settings.db_url)() as session:
        user = session.scalar(select(User).where(User.username == args.username))
        if user is None:
            print(f"error: no user {args.username!r}", file=sys.stderr)
            return 1
        if args.revoke_others:
            revoke_tokens(session, user=user)
        token = issue_token(session, user=user, secret_key=settings.secret_key, name=args.name)
        session.commit()
    print(token)
    return 0


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from graders.checkpoints import sha256_file
    from graders.datasets import CIFAR10_CLASSES, load_cifar10, save_eval_set, select_balanced

    images, labels = load_cifar10(args.cifar_dir, args.split)
    eval_set = select_balanced(
        images,
        labels,
        n=args.n,
        seed=args.seed,
        class_names=CIFAR10_CLASSES,
        source=f"CIFAR-10 {args.split} split, seed {args.seed}, {args.n // 10} per class",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_eval_set(eval_set, args.out)
    print(
        json.dumps(
            {"file": str(args.out), "images": len(eval_set), "sha256": sha256_file(args.out)}
        )
    )
    return 0


def cmd_assignments_check(args: argparse.Namespace) -> int:
    from server.assignments import SpecError, load_assignments

    settings = get_settings()
    directory = args.directory or settings.assignments_dir
    try:
        specs = load_assignments(directory, visibility_timeout_s=settings.visibility_timeout_s)
    except SpecError as exc:
        print(f"invalid assignment spec:\n{exc}", file=sys.stderr)
        return 1
    for spec in specs.values():
        print(f"{spec.slug}: {len(spec.phases)} phase(s) OK")
    return 0


def _client() -> Any:
    from server.client import AutograderClient, ClientConfig

    url, token = ClientConfig().resolved()
    return AutograderClient(url, token)


def _describe(submission: dict[str, Any]) -> str:
    status = submission["status"]
    if status == "queued" and submission.get("queue_position"):
        return f"queued (position {submission['queue_position']})"
    progress = submission.get("progress") or {}
    if status == "running" and progress.get("stage") == "attack":
        return (
            f"running ({progress['suite']} suite, attack {progress['attack_index']}/"
            f"{progress['attacks']} {progress['attack']}: "
            f"{progress['robust_points_left']} points still robust)"
        )
    if status == "running" and progress:
        return f"running ({progress.get('stage', '')})"
    results = submission.get("results") or {}
    if status == "scored" and results.get("metric") == "robust_accuracy":
        flags = ", ".join(f["code"] for f in results.get("flags", [])) or "none"
        return (
            f"scored: robust accuracy {submission['score']:.4f} ({results['leaderboard_suite']} "
            f"suite, higher is better), clean {results['clean_accuracy']:.4f}, final "
            f"({results['final_suite']}) {results['final_robust_accuracy']:.4f}; flags: {flags}"
        )
    if status == "scored":
        return f"scored: {submission['score']:.4f} (mean hidden-model accuracy, lower is better)"
    if status == "failed":
        return f"failed: {submission.get('error_message')}"
    return status


def cmd_submit(args: argparse.Namespace) -> int:
    from server.client import ClientError, print_progress

    if not args.file.is_file():
        print(f"error: {args.file} is not a file", file=sys.stderr)
        return 2
    try:
        client = _client()
        fields = {
            key: getattr(args, key)
            for key in ("architecture", "normalization", "mean", "std")
            if getattr(args, key) is not None
        }
        submission = client.submit(
            args.assignment,
            args.phase,
            args.file,
            fields=fields,
            manifest=args.manifest,
            report=print_progress,
        )
        if submission.get("reused"):
            print(
                "this file was already scored in this phase; its earlier result is reused "
                "(nothing charged)",
                flush=True,
            )
        print(f"submission {submission['id']}: {_describe(submission)}", flush=True)
        if args.wait:
            last = ""

            def report(current: dict[str, Any]) -> None:
                nonlocal last
                line = _describe(current)
                if line != last:
                    print(f"  {line}", file=sys.stderr, flush=True)
                    last = line

            submission = client.wait(submission["id"], timeout=args.timeout, report=report)
    except ClientError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        if exc.details:
            print(json.dumps(exc.details, indent=2), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(submission, indent=2))
    if args.wait:
        print(f"submission {submission['id']}: {_describe(submission)}")
        return 0 if submission["status"] == "scored" else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from server.client import ClientError

    try:
        submission = _client().submission(args.submission_id)
    except ClientError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    print(json.dumps(submission, indent=2) if args.json else _describe(submission))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autograder", description="Autograder for adversarial-ML course phases."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run migrations, then the API and a worker (Ctrl-C stops)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--no-worker", action="store_true", help="run the API only")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run one Celery worker (production: one per machine/GPU)")
    p.add_argument("--name", default="cpu", help="node name prefix")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="build (or reuse) the offline demo course and run it")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--rebuild", action="store_true", help="rebuild data and models")
    p.add_argument("--build-only", action="store_true", help="build, print accounts, do not serve")
    p.add_argument("--train-per-class", type=int, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--eval-images", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seconds-per-model", type=float, help=argparse.SUPPRESS)
    p.add_argument("--defense-iterations", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "sweep", help="requeue submissions of dead workers, send those the broker missed"
    )
    p.add_argument("--every", type=float, help="repeat every N seconds instead of once")
    p.set_defaults(func=cmd_sweep)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    p = db.add_parser("upgrade", help="apply Alembic migrations (creates the schema)")
    p.set_defaults(func=cmd_db_upgrade)

    users = sub.add_parser("user", help="accounts").add_subparsers(dest="user", required=True)
    p = users.add_parser("add", help="create a user and print an API token")
    p.add_argument("username")
    p.add_argument("--role", choices=["student", "ta", "instructor"], default="student")
    p.add_argument("--pseudonym")
    p.add_argument("--password", help="for the web pages (at least 8 characters)")
    p.set_defaults(func=cmd_user_add)
    p = users.add_parser("password", help="set a user's password for the web pages")
    p.add_argument("username")
    p.add_argument("--password", help="the new password (asked for when left out)")
    p.set_defaults(func=cmd_user_password)

    roster = sub.add_parser("roster", help="students").add_subparsers(dest="roster", required=True)
    p = roster.add_parser(
        "import", help="create students from a CSV (student_id,name,email) with invitation codes"
    )
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, help="write the codes here (mode 600) instead of stdout")
    p.add_argument("--reissue", action="store_true", help="new codes for students with passwords")
    p.set_defaults(func=cmd_roster_import)

    tokens = sub.add_parser("token", help="API tokens").add_subparsers(dest="token", required=True)
    p = tokens.add_parser("create", help="issue a new API token for a user")
    p.add_argument("username")
    p.add_argument("--name", default="cli")
    p.add_argument("--revoke-others", action="store_true")
    p.set_defaults(func=cmd_token_create)

    datasets = sub.add_parser("dataset", help="evaluation sets").add_subparsers(
        dest="dataset", required=True
    )
    p = datasets.add_parser("build", help="balanced evaluation set from cifar-10-batches-py")
    p.add_argument(
        "--cifar-dir",
        type=Path,
        required=True,
        help="folder holding (or being) cifar-10-batches-py",
    )
    p.add_argument("--n", type=int, default=500, help="images, a multiple of 10 (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--out", type=Path, required=True, help="output .npz (in the data dir)")
    p.set_defaults(func=cmd_dataset_build)

    assignments = sub.add_parser("assignments", help="assignment specs").add_subparsers(
        dest="assignments", required=True
    )
    p = assignments.add_parser("check", help="validate every spec")
    p.add_argument("directory", type=Path, nargs="?")
    p.set_defaults(func=cmd_assignments_check)

    p = sub.add_parser(
        "submit",
        help="upload an attack batch or a defense checkpoint (AUTOGRADER_URL, AUTOGRADER_TOKEN)",
    )
    p.add_argument("assignment")
    p.add_argument("phase")
    p.add_argument(
        "file", type=Path, help="batch (.zip/.npy/.npz) or checkpoint (.safetensors/.pt)"
    )
    p.add_argument("--architecture", help="defense phases: the registry architecture")
    p.add_argument("--normalization", help="defense phases: none or cifar10")
    p.add_argument("--mean", help="defense phases: input mean R,G,B (instead of --normalization)")
    p.add_argument("--std", help="defense phases: input std R,G,B (with --mean)")
    p.add_argument("--manifest", type=Path, help="defense phases: a JSON manifest file instead")
    p.add_argument("--wait", action="store_true", help="poll until scored, failed or cancelled")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait (default 1800)")
    p.add_argument("--json", action="store_true", help="print the final submission as JSON")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show one submission")
    p.add_argument("submission_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
