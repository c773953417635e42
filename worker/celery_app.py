"""The Celery app, configured from the service settings (embedded SQLite transport or Redis)."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from server.config import Settings, get_settings

SCORE_TASK = "worker.tasks.score_submission"
TRANSFER_TASK = "worker.tasks.transfer_attack"
CPU_QUEUE = "cpu"
"""Attack-phase scoring: forward passes only, fine on CPU workers."""
GPU_QUEUE = "gpu"
"""Defense evaluation and transfer: attack suites, for workers with a GPU (or any worker that
is told to consume it, as the embedded default's is)."""
QUEUES = (CPU_QUEUE, GPU_QUEUE)


def create_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``: late acks, prefetch 1, results kept in our database only."""
    app = Celery("autograder", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict[str, object] = {}
    if settings.is_embedded_broker:
        # kombu's SQLAlchemy transport forwards its transport options to create_engine, so the
        # polling interval (1 s by default: the latency floor of every task) is set on the class.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = settings.broker_polling_interval_s
    else:
        # Longer than any phase's hard time limit (checked when the specs are loaded), so a
        # task still running is never delivered a second time.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=CPU_QUEUE,
        # Explicit exchanges: a bare Queue(name) would inherit the default (cpu) exchange and
        # routing key, and defense evaluations would land on the cpu queue.
        task_queues=tuple(
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ),
        task_routes={SCORE_TASK: {"queue": CPU_QUEUE}, TRANSFER_TASK: {"queue": GPU_QUEUE}},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
        worker_enable_remote_control=not settings.is_embedded_broker,
        worker_hijack_root_logger=False,
    )
    return app


_apps: dict[str, Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """The Celery app publishing to ``settings``' broker (one per broker URL in a process)."""
    app = _apps.get(settings.broker_url)
    if app is None:
        app = _apps[settings.broker_url] = create_celery(settings)
    return app


celery_app = celery_for(get_settings())
