"""Type hints of the steadfast package (the extension module's API)."""

from os import PathLike
from types import TracebackType
from typing import Dict, Iterator, List, Optional, Tuple, Type, Union

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

class Receipt:
    """Proof that a message is on disk; tells when it is delivered."""

    id: int
    producer: str
    @property
    def outcome(self) -> Optional[str]:
        """``"delivered"``, ``"dropped: REASON"``, or None while queued."""
    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once a broker acknowledged it; False on timeout or a drop."""

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
    ) -> None: ...
    def publish(
        self,
        topic: str,
        payload: Union[bytes, str],
        *,
        qos: Optional[int] = None,
        retain: bool = False,
        ttl: Optional[float] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        keep_latest: bool = False,
    ) -> Receipt:
        """Returns once the message is on disk (accepted)."""
    def publish_many(
        self,
        messages: List[Tuple[str, Union[bytes, str]]],
        *,
        qos: Optional[int] = None,
        retain: bool = False,
    ) -> List[Receipt]:
        """Returns once all are on disk (sharing the syncs), a receipt each."""
    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """True once the outbox is empty; False when the timeout passed."""
    def status(self) -> Dict[str, object]:
        """queued, bytes, oldest_age, drops (reason -> count), brokers."""
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
        """Handled: recorded in the inbox, then acknowledged to the broker."""
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
        dedup: bool = True,
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
        dedup: bool = True,
    ) -> None:
        """Creates the session and subscriptions before any producer runs."""
    def next(self, timeout: Optional[float] = None) -> Optional[Delivery]:
        """The next delivery; None on timeout or once closed."""
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
