"""Messages reach the queue they are sent to: defense evaluations must not land on the cpu queue
(a cpu-only worker would run them), attack scoring must not land on the gpu queue."""

from __future__ import annotations

import pytest
from kombu import Connection

from server.config import Settings
from worker.celery_app import CPU_QUEUE, GPU_QUEUE, SCORE_TASK, create_celery


@pytest.mark.parametrize("queue", [CPU_QUEUE, GPU_QUEUE])
def test_a_task_sent_to_a_queue_is_delivered_from_that_queue_only(
    settings: Settings, queue: str
) -> None:
    app = create_celery(settings.model_copy(update={"celery_broker_url": "memory://"}))
    for name, declared in app.amqp.queues.items():
        assert declared.exchange.name == name and declared.routing_key == name
    with Connection("memory://") as connection:
        app.send_task(SCORE_TASK, args=["abc"], queue=queue, connection=connection)
        other = GPU_QUEUE if queue == CPU_QUEUE else CPU_QUEUE
        with connection.SimpleQueue(other) as wrong:
            with pytest.raises(wrong.Empty):
                wrong.get(block=False)
        with connection.SimpleQueue(queue) as right:
            message = right.get(block=False)
            assert message.headers["task"] == SCORE_TASK
            message.ack()
