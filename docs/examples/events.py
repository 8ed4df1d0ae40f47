"""Events: a topic exchange (RabbitMQ tutorial 5), one handler per server and one per group."""

import threading

from kombu_rpc import Event, EventPublisher, Registry, RPCServer

registry = Registry()
handled = threading.Semaphore(0)


@registry.subscribe("logs", "kern.*")  # every server handles each kernel log line
def on_kernel_log(event: Event) -> None:
    print(f"{event.routing_key}: {event.payload['message']}")
    handled.release()


@registry.subscribe("logs", "*.critical", group="pager")  # one server of the group pages
def page(event: Event) -> None:
    print(f"paging: {event.payload['message']}")
    handled.release()


def main() -> None:
    with RPCServer("memory://", registry=registry).running():  # serves calls and events
        with EventPublisher("memory://", exchange="logs", type="topic") as events:
            events.publish("kern.info", {"message": "eth0 up"})
            events.publish("kern.critical", {"message": "disk full"})  # both handlers
            events.publish("cron.info", {"message": "nothing for anyone"})
        for _ in range(3):  # kern.info, then kern.critical twice
            assert handled.acquire(timeout=10), "an event was not handled"


if __name__ == "__main__":
    main()
