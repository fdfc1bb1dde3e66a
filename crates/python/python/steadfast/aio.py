"""The asyncio flavour of steadfast: the same Client and Consumer, with
awaitable calls.

Each blocking call runs in a worker thread (``asyncio.to_thread``); the
extension releases the GIL while it waits, so the event loop and other
threads keep running. Opening (the constructors) reads the outbox or inbox
on local disk and returns quickly; it is not awaited.

    import asyncio, steadfast.aio

    async def main():
        async with steadfast.aio.Client("gw-1", brokers=["mqtt://127.0.0.1:1883"], outbox="/var/lib/gw1") as client:
            receipt = await client.publish("sensors/t", b"21.5")   # on disk now
            await receipt.wait(timeout=10)                          # acknowledged

        async with steadfast.aio.Consumer("line1", brokers=["mqtt://127.0.0.1:1883"],
                                          inbox="/var/lib/line1", topics=["sensors/#"]) as consumer:
            async for delivery in consumer:
                handle(delivery)
                delivery.ack()
"""

import asyncio
from typing import Any, Dict, List, Optional

from . import Client as _Client
from . import Consumer as _Consumer
from . import Delivery, Event, Events as _Events, Receipt as _Receipt

__all__ = ["Client", "Consumer", "Events", "Receipt"]

# How long one wait in a worker thread lasts before the coroutine looks
# again (so that cancelling it takes effect within this).
_SLICE = 0.25


async def _in_slices(call: Any, timeout: Optional[float], done: Any) -> Any:
    """Calls the blocking `call(seconds)` in a worker thread, a slice at a
    time, until `done(result)` or `timeout` seconds passed; the last result."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        left = _SLICE if deadline is None else min(_SLICE, max(0.0, deadline - loop.time()))
        result = await asyncio.to_thread(call, left)
        if done(result) or (deadline is not None and loop.time() >= deadline):
            return result


class Receipt:
    """Proof that a message is on disk; ``await wait()`` until it is delivered."""

    def __init__(self, inner: _Receipt) -> None:
        self._inner = inner
        self.id = inner.id
        self.producer = inner.producer

    @property
    def outcome(self) -> Optional[str]:
        return self._inner.outcome

    @property
    def asks_receipts(self) -> bool:
        return self._inner.asks_receipts

    @property
    def handling(self) -> Optional[str]:
        return self._inner.handling

    @property
    def handled_by(self) -> Optional[List[str]]:
        return self._inner.handled_by

    async def wait(self, timeout: Optional[float] = None) -> bool:
        """True once a broker acknowledged it; False on timeout or a drop."""
        return await _in_slices(self._inner.wait, timeout, lambda ok: ok or self._inner.outcome is not None)

    async def wait_handled(self, timeout: Optional[float] = None) -> bool:
        """True once its consumers' receipts met its rule; False on timeout or a drop."""
        ended = (lambda: self._inner.handling is not None) if self._inner.asks_receipts else (lambda: self._inner.outcome is not None)
        return await _in_slices(self._inner.wait_handled, timeout, lambda ok: ok or ended())

    def __repr__(self) -> str:
        return repr(self._inner)


class Events:
    """The events from now on: ``async for event in client.events()``."""

    def __init__(self, inner: _Events) -> None:
        self._inner = inner

    async def next(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event; None on timeout or once closed."""
        return await _in_slices(self._inner.next, timeout, lambda e: e is not None)

    def __aiter__(self) -> "Events":
        return self

    async def __anext__(self) -> Event:
        e = await _in_slices(self._inner.next, None, lambda e: e is not None or self._inner.closed)
        if e is None:
            raise StopAsyncIteration
        return e


class Client:
    """A reliable MQTT publisher with an outbox on disk (see ``steadfast.Client``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._inner = _Client(*args, **kwargs)

    async def publish(self, topic: str, payload: Any, **kwargs: Any) -> Receipt:
        """Returns once the message is on disk (accepted)."""
        return Receipt(await asyncio.to_thread(self._inner.publish, topic, payload, **kwargs))

    async def publish_many(self, messages: Any, **kwargs: Any) -> List[Receipt]:
        """Returns once all are on disk (sharing the syncs), a receipt each."""
        inner = await asyncio.to_thread(self._inner.publish_many, messages, **kwargs)
        return [Receipt(r) for r in inner]

    async def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """True once the outbox is empty; False when the timeout passed."""
        return await asyncio.to_thread(self._inner.wait_idle, timeout)

    async def status(self) -> Dict[str, object]:
        return await asyncio.to_thread(self._inner.status)

    def events(self) -> Events:
        """The events from now on: ``async for event in client.events()``."""
        return Events(self._inner.events())

    @property
    def producer_id(self) -> str:
        return self._inner.producer_id

    async def close(self) -> None:
        await asyncio.to_thread(self._inner.close)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        await self.close()
        return False


class Consumer:
    """A reliable MQTT consumer (see ``steadfast.Consumer``): ``async for``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._inner = _Consumer(*args, **kwargs)

    @staticmethod
    async def register(*args: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(_Consumer.register, *args, **kwargs)

    async def next(self, timeout: Optional[float] = None) -> Optional[Delivery]:
        """The next delivery; None on timeout or once closed."""
        return await _in_slices(self._inner.next, timeout, lambda d: d is not None or self._inner.closed)

    def events(self) -> Events:
        """Connection events and suspected losses from now on."""
        return Events(self._inner.events())

    @property
    def handled(self) -> int:
        return self._inner.handled

    def __aiter__(self) -> "Consumer":
        return self

    async def __anext__(self) -> Delivery:
        d = await self.next()
        if d is None:
            raise StopAsyncIteration
        return d

    async def close(self) -> None:
        await asyncio.to_thread(self._inner.close)

    async def __aenter__(self) -> "Consumer":
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        await self.close()
        return False
