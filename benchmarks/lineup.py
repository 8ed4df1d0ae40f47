"""Which implementations run on a broker, and finding one by name (server processes
build theirs from its name)."""

from __future__ import annotations

from .baselines import PikaTutorial, RawKombu
from .brokers import Broker
from .implementations import Implementation, KombuRPC


def implementations(broker: Broker, call_timeout: float) -> list[Implementation]:
    """The implementations compared on ``broker``: baselines first, then kombu_rpc."""
    impls: list[Implementation] = [RawKombu(broker, call_timeout)]
    if broker.name == "memory":
        impls.append(RawKombu(broker, call_timeout, busy_poll=True))
    if broker.name == "amqp":
        impls.append(RawKombu(broker, call_timeout, confirms=True))
        impls.append(PikaTutorial(broker, call_timeout))
    impls.append(KombuRPC(broker, call_timeout))
    impls.append(KombuRPC(broker, call_timeout, metrics=True))
    if broker.name == "amqp":
        impls.append(KombuRPC(broker, call_timeout, confirm_publish=False))
        impls.append(KombuRPC(broker, call_timeout, prefetch_multiplier=4))
        for variant in (
            KombuRPC(broker, call_timeout, prefetch_multiplier=2),
            KombuRPC(broker, call_timeout, call_async=True),
        ):
            variant.families = frozenset({"pipelined"})  # how calls in flight go: measured there
            impls.append(variant)
    return impls


def implementation(broker: Broker, name: str, call_timeout: float) -> Implementation:
    """The implementation called ``name`` on ``broker``.

    Raises:
        ValueError: No implementation of that name runs on ``broker``.
    """
    for impl in implementations(broker, call_timeout):
        if impl.name == name:
            return impl
    raise ValueError(f"no implementation {name!r} on {broker.name}")
