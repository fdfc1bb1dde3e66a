"""Type hints of the steadfast package (the extension module's API)."""

from os import PathLike
from types import TracebackType
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

_Path = Union[str, "PathLike[str]"]

class SteadfastError(Exception):
    """Every error steadfast raises."""

class ConfigError(SteadfastError):
    """A setting is invalid: the message names it and the fix."""

class ConnectError(SteadfastError):
    """A broker could not be reached or spoke no MQTT."""

class RefusedError(ConnectError):
    """A broker refused the connection (credentials, client id)."""

class StoreError(SteadfastError):
    """The outbox or inbox on disk cannot be used."""

class PublishError(SteadfastError):
    """A message was not accepted (nothing was stored)."""

class ClosedError(SteadfastError):
    """The client or consumer is closed."""

class Tls:
    """TLS settings for ``mqtts://`` and ``wss://`` brokers."""

    ca_file: Optional[str]
    cert: Optional[str]
    key: Optional[str]
    insecure: bool
    alpn: List[str]
    def __init__(
        self,
        *,
        ca_file: Optional[_Path] = None,
        cert: Optional[_Path] = None,
        key: Optional[_Path] = None,
        insecure: bool = False,
        alpn: Optional[List[str]] = None,
    ) -> None:
        """``ca_file``: trust only these CA certificates (PEM; default: the
        platform's roots); ``cert`` and ``key``: a client certificate for
        mutual TLS; ``insecure``: do not verify the broker; ``alpn``:
        protocol names to offer."""

class Receipts:
    """What a message asks of its consumers: a receipt once handled."""

    def __init__(
        self,
        *,
        consumers: Optional[List[str]] = None,
        need: Union[str, int, None] = None,
        timeout: float = 30.0,
    ) -> None:
        """``consumers``: the names that count (default: any consumer);
        ``need``: ``"any"``, ``"all"`` or a count (default: all of
        ``consumers``, or one from any); ``timeout``: seconds after the
        broker's acknowledgement before the message is published again."""

class Route:
    """A named set of brokers: ``publish(..., route=NAME)``."""

    def __init__(
        self,
        brokers: List[str],
        *,
        mode: str = "failover",
        ack: Union[str, int, None] = None,
        failback_after: Optional[float] = None,
        catch_up_for: Optional[float] = None,
        delivery_class: Optional[str] = None,
        ttl: Optional[float] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        keep_latest: Optional[bool] = None,
    ) -> None: ...

class Event:
    """Something that happened: a connection, a failover, a drop, a loss."""

    kind: str
    """connected, connect_failed, disconnected, session_lost, refused,
    dropped, failover, failback, suspected_loss, republished, lagged."""
    broker: Optional[str]
    @property
    def detail(self) -> Dict[str, object]: ...

class Events:
    """The events from now on; the iteration ends once closed."""

    def next(self, timeout: Optional[float] = None) -> Optional[Event]: ...
    @property
    def closed(self) -> bool: ...
    def __iter__(self) -> Iterator[Event]: ...
    def __next__(self) -> Event: ...

class Receipt:
    """Proof that a message is on disk; tells when it is delivered (and
    handled, when it asks for receipts)."""

    id: int
    producer: str
    @property
    def outcome(self) -> Optional[str]:
        """``"delivered"``, ``"dropped: REASON"``, or None while queued."""
    @property
    def asks_receipts(self) -> bool: ...
    @property
    def handling(self) -> Optional[str]:
        """``"handled"``, ``"dropped: REASON"``, or None while it waits."""
    @property
    def handled_by(self) -> Optional[List[str]]:
        """The consumers whose receipts completed it."""
    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once a broker acknowledged it; False on timeout or a drop."""
    def wait_handled(self, timeout: Optional[float] = None) -> bool:
        """True once its consumers' receipts met its rule (delivered, for a
        message that asks for none); False on timeout or a drop."""

_Receipts = Union[bool, Receipts]
_Ack = Union[str, int]

class Client:
    """A reliable MQTT publisher with an outbox on disk."""

    def __init__(
        self,
        client_id: str,
        brokers: List[str],
        outbox: _Path,
        *,
        mode: str = "failover",
        version: int = 5,
        qos: int = 1,
        username: Optional[str] = None,
        password: Optional[str] = None,
        keep_alive: Optional[float] = None,
        tls: Optional[Tls] = None,
        backoff: Optional[str] = None,
        ack: Optional[_Ack] = None,
        failback_after: Optional[float] = None,
        catch_up_for: Optional[float] = None,
        routes: Optional[Dict[str, Union[Route, List[str]]]] = None,
        delivery_class: Optional[str] = None,
        ttl: Optional[float] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        keep_latest: Optional[bool] = None,
        receipts: Optional[_Receipts] = None,
        receipt_prefix: Optional[str] = None,
        max_messages: Optional[int] = None,
        max_bytes: Optional[int] = None,
        max_age: Optional[float] = None,
        overflow: Optional[str] = None,
        on_event: Optional[Callable[[Event], None]] = None,
    ) -> None: ...
    def publish(
        self,
        topic: str,
        payload: Union[bytes, str],
        *,
        qos: Optional[int] = None,
        retain: bool = False,
        route: Optional[str] = None,
        delivery_class: Optional[str] = None,
        ttl: Optional[float] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        keep_latest: Optional[bool] = None,
        receipts: Optional[_Receipts] = None,
        content_type: Optional[str] = None,
        user_properties: Optional[List[Tuple[str, str]]] = None,
    ) -> Receipt:
        """Returns once the message is on disk (accepted)."""
    def publish_many(
        self,
        messages: List[Tuple[str, Union[bytes, str]]],
        *,
        qos: Optional[int] = None,
        retain: bool = False,
        route: Optional[str] = None,
        delivery_class: Optional[str] = None,
        ttl: Optional[float] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        keep_latest: Optional[bool] = None,
        receipts: Optional[_Receipts] = None,
        content_type: Optional[str] = None,
        user_properties: Optional[List[Tuple[str, str]]] = None,
    ) -> List[Receipt]:
        """Returns once all are on disk (sharing the syncs), a receipt each."""
    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """True once the outbox is empty; False when the timeout passed."""
    def status(self) -> Dict[str, object]:
        """queued, bytes, oldest_age, drops (reason -> count), receipts, brokers."""
    def poisoned(self) -> List[Dict[str, object]]:
        """The messages moved aside as poison, oldest first: id, topic, bytes, qos,
        broker, at_ms, refused (a refusal's reason code and name, say
        "0x87, not authorized", or None), failures."""
    def events(self) -> Events:
        """The events from now on (the first call: since the client opened)."""
    @property
    def producer_id(self) -> str: ...
    def close(self) -> None:
        """Stops sending; what is queued stays on disk for the next run."""
    def __enter__(self) -> "Client": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Delivery:
    """A message handed to the application: ``ack()`` once handled."""

    topic: str
    qos: int
    retain: bool
    redelivered: bool
    broker: str
    @property
    def payload(self) -> bytes: ...
    @property
    def identity(self) -> Optional[Tuple[str, int]]:
        """(producer id, sequence number) when steadfast published it."""
    @property
    def properties(self) -> Dict[str, object]:
        """MQTT 5: content_type and user (a list of pairs)."""
    def ack(self) -> None:
        """Handled: acknowledged to the broker and recorded in the inbox
        (a receipt sent once recorded, if the producer asked for one)."""
    def nack(self) -> None:
        """Not handled: it comes again after a pause."""

class Consumer:
    """A reliable MQTT consumer: inbox on disk, ack after handling."""

    def __init__(
        self,
        client_id: str,
        brokers: List[str],
        inbox: _Path,
        topics: List[str],
        *,
        qos: int = 1,
        version: int = 5,
        username: Optional[str] = None,
        password: Optional[str] = None,
        keep_alive: Optional[float] = None,
        tls: Optional[Tls] = None,
        backoff: Optional[str] = None,
        dedup: bool = True,
        gap_timeout: Optional[float] = None,
        retry_after: Optional[float] = None,
        receipt_as: Optional[str] = None,
        send_receipts: bool = True,
        receipt_prefix: Optional[str] = None,
        inbox_max_age: Optional[float] = None,
        inbox_max_count: Optional[int] = None,
        group: Optional[str] = None,
        shared_inbox: Optional[str] = None,
        claim_for: Optional[float] = None,
        on_event: Optional[Callable[[Event], None]] = None,
    ) -> None: ...
    @staticmethod
    def register(
        client_id: str,
        brokers: List[str],
        inbox: _Path,
        topics: List[str],
        *,
        qos: int = 1,
        version: int = 5,
        username: Optional[str] = None,
        password: Optional[str] = None,
        keep_alive: Optional[float] = None,
        tls: Optional[Tls] = None,
        backoff: Optional[str] = None,
        dedup: bool = True,
        gap_timeout: Optional[float] = None,
        retry_after: Optional[float] = None,
        receipt_as: Optional[str] = None,
        send_receipts: bool = True,
        receipt_prefix: Optional[str] = None,
        inbox_max_age: Optional[float] = None,
        inbox_max_count: Optional[int] = None,
        group: Optional[str] = None,
        shared_inbox: Optional[str] = None,
        claim_for: Optional[float] = None,
        on_event: Optional[Callable[[Event], None]] = None,
    ) -> None:
        """Creates the session and subscriptions before any producer runs."""
    def next(self, timeout: Optional[float] = None) -> Optional[Delivery]:
        """The next delivery; None on timeout or once closed."""
    def events(self) -> Events:
        """Connection events and suspected losses from now on."""
    @property
    def handled(self) -> int:
        """Deliveries acknowledged by this process so far."""
    @property
    def closed(self) -> bool: ...
    def __iter__(self) -> Iterator[Delivery]: ...
    def __next__(self) -> Delivery: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Consumer": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

def group_status(url: str, group: Optional[str] = None) -> List[Dict[str, object]]:
    """The consumer groups whose shared inbox is the PostgreSQL database at
    ``url`` (or only ``group``): ``group``, ``handled``, ``duplicates``,
    ``remembered``, ``claims`` and ``members`` (each ``member``,
    ``last_seen``: seconds ago, ``handled``, ``duplicates``). Read only."""
    ...
