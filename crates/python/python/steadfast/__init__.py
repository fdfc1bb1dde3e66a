"""steadfast: reliable MQTT delivery.

Every message is on disk (the outbox) before ``publish`` returns, and
leaves it only when a broker acknowledged it: a crash, a dead broker or a
dropped network loses nothing. A consumer removes copies by identity (its
inbox on disk) and acknowledges a message to the broker only after
``Delivery.ack()``. The same Rust library as the ``steadfast`` command;
docs/python.md has the whole API and how it maps to paho-mqtt.
"""

from ._steadfast import (
    ClosedError,
    ConfigError,
    ConnectError,
    Client,
    Consumer,
    Delivery,
    PublishError,
    Receipt,
    RefusedError,
    SteadfastError,
    StoreError,
)

__all__ = [
    "Client",
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "Consumer",
    "Delivery",
    "PublishError",
    "Receipt",
    "RefusedError",
    "SteadfastError",
    "StoreError",
]
