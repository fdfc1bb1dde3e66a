"""steadfast: reliable MQTT delivery.

Every message is on disk (the outbox) before ``publish`` returns, and
leaves it only when a broker acknowledged it: a crash, a dead broker or a
dropped network loses nothing. A consumer removes copies by identity (its
inbox on disk) and acknowledges a message to the broker only after
``Delivery.ack()``. The same Rust library as the ``steadfast`` command;
docs/python.md has the whole API and how it maps to paho-mqtt.
"""

import sys
import traceback

from ._steadfast import (
    ClosedError,
    ConfigError,
    ConnectError,
    Client,
    Consumer,
    Delivery,
    Event,
    Events,
    PublishError,
    Receipt,
    Receipts,
    RefusedError,
    Route,
    SteadfastError,
    StoreError,
    Tls,
    group_status,
)

__all__ = [
    "group_status",
    "Client",
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "Consumer",
    "Delivery",
    "Event",
    "Events",
    "PublishError",
    "Receipt",
    "Receipts",
    "RefusedError",
    "Route",
    "SteadfastError",
    "StoreError",
    "Tls",
]


def _pump_events(events, callback):
    """The thread behind ``on_event=``: calls ``callback(event)`` for each
    event until the client or consumer is closed. An exception in the
    callback is printed and the next event still comes."""
    for event in events:
        try:
            callback(event)
        except Exception:  # noqa: BLE001 - a callback's bug must not stop the events
            print(f"steadfast: the on_event callback raised on {event!r}:", file=sys.stderr)
            traceback.print_exc()
