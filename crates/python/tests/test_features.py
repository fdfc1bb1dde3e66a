"""The rest of the Rust API from Python, against real Mosquitto: TLS,
routes, end-to-end receipts, events, outbox bounds, backoff, fail-back."""

import asyncio
import threading
import time

import pytest

import steadfast
import steadfast.aio
from conftest import Broker, certificates, drain, free_port, wait_until


def events_of(kind, events, timeout=20.0):
    """Reads `events` until one of `kind` comes; returns it."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} event within {timeout}s"
        e = events.next(timeout=left)
        assert e is not None, f"no {kind} event within {timeout}s (closed)"
        if e.kind == kind:
            return e


def test_tls_with_a_private_ca_and_a_clear_error_without_it(tmp):
    """A broker with a certificate of our own CA: trusted with
    Tls(ca_file=...), refused (with the reason) by the platform's roots."""
    ca, cert, key = certificates()
    broker = Broker(tls=(ca, cert, key)).start()
    try:
        tls = steadfast.Tls(ca_file=ca)
        args = dict(client_id="py-tls", brokers=[broker.url], inbox=tmp / "inbox", topics=["tls/#"], tls=tls)
        steadfast.Consumer.register(**args)
        with steadfast.Client("py-tls-p", brokers=[broker.url], outbox=tmp / "outbox", tls=tls) as client:
            receipts = client.publish_many([("tls/t", f"s-{i}") for i in range(20)])
            assert all(r.wait(timeout=20) for r in receipts), client.status()
        with steadfast.Consumer(**args) as consumer:
            seen = drain(consumer, 20)
        assert set(seen.values()) == {1}

        with steadfast.Client("py-tls-bad", brokers=[broker.url], outbox=tmp / "bad") as client:
            failed = events_of("connect_failed", client.events())
            assert "certificate" in failed.detail["error"].lower(), failed
            assert not client.publish("tls/t", b"x").wait(timeout=0.5)
        with pytest.raises(steadfast.ConfigError, match="cert= and key="):
            steadfast.Tls(cert=cert)
        with pytest.raises(steadfast.ConfigError, match="ca_file"):
            steadfast.Tls(ca_file=tmp / "missing.pem")
    finally:
        broker.kill9()


def test_a_route_sends_its_messages_to_its_own_brokers(tmp):
    a, b = Broker().start(), Broker().start()
    try:
        on_a = dict(client_id="py-ra", brokers=[a.url], inbox=tmp / "ia", topics=["#"])
        on_b = dict(client_id="py-rb", brokers=[b.url], inbox=tmp / "ib", topics=["#"])
        steadfast.Consumer.register(**on_a)
        steadfast.Consumer.register(**on_b)
        routes = {"alarms": steadfast.Route([b.url], priority=9), "plain": [b.url]}
        with steadfast.Client("py-route", brokers=[a.url], outbox=tmp / "o", routes=routes) as client:
            client.publish_many([("t/reading", f"r-{i}") for i in range(10)])
            client.publish_many([("t/alarm", f"a-{i}") for i in range(5)], route="alarms")
            client.publish("t/plain", b"p", route="plain")
            with pytest.raises(steadfast.PublishError, match="nowhere"):
                client.publish("t/x", b"x", route="nowhere")
            assert client.wait_idle(timeout=20), client.status()
        with steadfast.Consumer(**on_a) as consumer:
            assert sorted(drain(consumer, 10)) == sorted(f"r-{i}".encode() for i in range(10))
            assert consumer.next(timeout=0.3) is None
        with steadfast.Consumer(**on_b) as consumer:
            assert sorted(drain(consumer, 6)) == sorted([f"a-{i}".encode() for i in range(5)] + [b"p"])
    finally:
        a.kill9()
        b.kill9()


def test_receipts_tell_when_the_consumer_handled_each_message(broker, tmp):
    """A message that asks for receipts stays in the outbox until the named
    consumer recorded it; the receipt names that consumer."""
    args = dict(client_id="py-rc", brokers=[broker.url], inbox=tmp / "inbox", topics=["rc/#"], receipt_as="line1")
    steadfast.Consumer.register(**args)
    rule = steadfast.Receipts(consumers=["line1"], timeout=10)
    with steadfast.Client("py-rc-p", brokers=[broker.url], outbox=tmp / "o", receipts=rule) as client:
        receipts = client.publish_many([("rc/t", f"job-{i}") for i in range(20)])
        plain = client.publish("rc/t", b"no receipt", receipts=False)
        assert all(r.wait(timeout=20) for r in receipts)
        assert all(r.asks_receipts for r in receipts) and not plain.asks_receipts
        # Delivered to the broker, not handled: nobody consumed them yet.
        assert not receipts[0].wait_handled(timeout=0.3)
        assert receipts[0].handling is None
        assert client.status()["receipts"]["awaiting"] == 20
        with steadfast.Consumer(**args) as consumer:
            drain(consumer, 21)
            assert all(r.wait_handled(timeout=20) for r in receipts), client.status()
        assert {tuple(r.handled_by) for r in receipts} == {("line1",)}
        assert receipts[0].handling == "handled"
        assert plain.wait_handled(timeout=5) and plain.handled_by is None
        assert client.wait_idle(timeout=10)
        assert client.status()["receipts"]["handled"] == 20


def test_a_message_the_broker_refuses_for_good_is_poison_with_its_code(tmp):
    """Mosquitto's ACL denies a topic (PUBACK 0x87 over MQTT 5): the
    message is moved aside as poison, said as a `dropped` event and listed
    by `poisoned()` with its code; the next one goes on."""
    broker = Broker(acl="topic readwrite ok/#\n").start()
    try:
        with steadfast.Client("py-acl", brokers=[broker.url], outbox=tmp / "outbox") as client:
            events = client.events()
            denied = client.publish("denied/t", b"x")
            dropped = events_of("dropped", events)
            assert dropped.detail["reason"] == "poison" and dropped.detail["topic"] == "denied/t", dropped
            assert not denied.wait(timeout=1) and denied.outcome == "dropped: poison"
            assert client.publish("ok/t", b"y").wait(timeout=20), client.status()
            (p,) = client.poisoned()
            assert (p["topic"], p["refused"], p["failures"]) == ("denied/t", "0x87, not authorized", 0), p
            assert p["broker"] == broker.url
    finally:
        broker.kill9()


def test_events_as_a_callback_and_as_an_iterator(tmp):
    port = free_port(below_ephemeral=True)
    url = f"mqtt://127.0.0.1:{port}"
    got, lock = [], threading.Lock()

    def on_event(e):
        with lock:
            got.append(e)

    def kinds():
        with lock:
            return [e.kind for e in got]

    with steadfast.Client("py-ev", brokers=[url], outbox=tmp / "o", on_event=on_event, backoff="300ms..300ms") as client:
        events = client.events()
        failed = events_of("connect_failed", events)
        assert failed.broker == url and failed.detail["retry_in"] == pytest.approx(0.3)
        stale = client.publish("ev/t", b"stale", ttl=0.2)
        dropped = events_of("dropped", events)
        assert dropped.detail == {"id": stale.id, "topic": "ev/t", "reason": "expired"}
        assert stale.outcome == "dropped: expired"
        broker = Broker(port=port).start()
        try:
            connected = events_of("connected", events)
            assert connected.broker == url
            wait_until("the callback saw the connection", lambda: "connected" in kinds())
            assert "connect_failed" in kinds() and "dropped" in kinds()
        finally:
            broker.kill9()
        events_of("disconnected", events)
    # Closing ends the iteration.
    assert events.next(timeout=5) is None and events.closed


def test_a_full_outbox_follows_its_overflow_policy(tmp):
    down = f"mqtt://127.0.0.1:{free_port(below_ephemeral=True)}"
    with steadfast.Client("py-full", brokers=[down], outbox=tmp / "a", max_messages=3, overflow="drop-oldest") as c:
        receipts = [c.publish("full/t", f"m-{i}") for i in range(5)]
        status = c.status()
        assert status["queued"] == 3 and status["drops"]["overflow"] == 2, status
        assert [r.outcome for r in receipts] == ["dropped: overflow"] * 2 + [None] * 3
    with steadfast.Client("py-rej", brokers=[down], outbox=tmp / "b", max_bytes=100, overflow="reject") as c:
        c.publish("full/t", b"x" * 60)
        with pytest.raises(steadfast.PublishError, match="full"):
            c.publish("full/t", b"x" * 60)
        assert c.status()["queued"] == 1
    with pytest.raises(steadfast.ConfigError, match="drop-newest"):
        steadfast.Client("py-bad", brokers=[down], outbox=tmp / "c", max_messages=3, overflow="spill")


def test_failover_queues_while_both_are_down_and_fails_back(tmp):
    """The primary goes down: the backup takes over; both down: messages
    wait on disk; the primary back and healthy for 1 s: traffic returns to
    it. Each message reaches the consumer on both brokers once. (The
    brokers stop cleanly and keep the consumer's session, so that what
    reaches a broker before the consumer is back waits for it there.)"""
    a = Broker(port=free_port(below_ephemeral=True), persistence=True).start()
    b = Broker(port=free_port(below_ephemeral=True), persistence=True).start()
    try:
        args = dict(client_id="py-fb", brokers=[a.url, b.url], inbox=tmp / "inbox", topics=["fb/#"], backoff="100ms..500ms")
        steadfast.Consumer.register(**args)
        seen = {}
        with steadfast.Consumer(**args) as consumer, steadfast.Client(
            "py-fb-p", brokers=[a.url, b.url], outbox=tmp / "o", failback_after=1.0, backoff="100ms..500ms"
        ) as client:
            events = client.events()

            def batch(name, n=10):
                client.publish_many([("fb/t", f"{name}-{i}") for i in range(n)])

            def acked():
                return [x["acked"] for x in client.status()["brokers"]]

            def take(n):
                seen.update({k: seen.get(k, 0) + v for k, v in drain(consumer, n - len(seen)).items()})

            batch("first")
            assert client.wait_idle(timeout=20) and acked() == [10, 0]
            take(10)
            a.stop()
            batch("second")
            assert client.wait_idle(timeout=20) and acked() == [10, 10], client.status()
            assert events_of("failover", events).detail["to"] == b.url
            take(20)
            b.stop()
            batch("third")
            assert not client.wait_idle(timeout=0.5)
            assert client.status()["queued"] == 10
            a.start()
            assert client.wait_idle(timeout=20), client.status()
            assert acked() == [20, 10]
            take(30)
            b.start()
            a.stop()
            batch("fourth")
            assert client.wait_idle(timeout=20) and acked() == [20, 20], client.status()
            take(40)
            a.start()
            back = events_of("failback", events)
            assert (back.detail["from"], back.detail["to"]) == (b.url, a.url)
            batch("fifth")
            assert client.wait_idle(timeout=20) and acked() == [30, 20], client.status()
            take(50)
        assert len(seen) == 50 and set(seen.values()) == {1}
    finally:
        a.kill9()
        b.kill9()


def test_asyncio_receipts_and_events(broker, tmp):
    args = dict(client_id="py-arc", brokers=[broker.url], inbox=tmp / "inbox", topics=["arc/#"])

    async def main():
        await steadfast.aio.Consumer.register(**args)
        async with steadfast.aio.Client("py-arc-p", brokers=[broker.url], outbox=tmp / "o", receipts=True) as client:
            async for e in client.events():
                if e.kind == "connected":
                    break
            receipt = await client.publish("arc/t", b"hello")
            assert not await receipt.wait_handled(timeout=0.3)
            async with steadfast.aio.Consumer(**args) as consumer:
                d = await consumer.next(timeout=20)
                assert d is not None and d.payload == b"hello"
                d.ack()
                assert await receipt.wait_handled(timeout=20)
                return receipt.handled_by

    assert asyncio.run(main()) == ["py-arc"]


def test_bad_backoff_and_receipt_rules_raise_config_error(tmp):
    url = "mqtt://127.0.0.1:1883"
    with pytest.raises(steadfast.ConfigError, match="backoff"):
        steadfast.Client("x", brokers=[url], outbox=tmp / "o", backoff="fast")
    with pytest.raises(steadfast.ConfigError, match="receipts"):
        steadfast.Receipts(need="all")
    with pytest.raises(steadfast.ConfigError, match="receipts"):
        steadfast.Receipts(consumers=["a"], need=2)
    with pytest.raises(steadfast.ConfigError, match="ack"):
        steadfast.Client("x", brokers=[url], outbox=tmp / "o", ack="any")
    with pytest.raises(TypeError, match="publish\\(\\) got an unexpected keyword argument 'ttl_s'"):
        with steadfast.Client("x", brokers=[url], outbox=tmp / "o2") as c:
            c.publish("t", b"x", ttl_s=3)



INTERRUPTED = """
import sys, threading, time, steadfast
url, inbox = sys.argv[1], sys.argv[2]
consumer = steadfast.Consumer("py-int", brokers=[url], inbox=inbox, topics=["int/#"])

def tick():
    # Runs only while the main thread's wait has let go of the GIL.
    for _ in range(50):
        time.sleep(0.01)
    print("ticked", flush=True)

threading.Thread(target=tick, daemon=True).start()
try:
    consumer.next()  # nothing comes: blocks until Ctrl-C
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_interrupts_a_blocking_wait_and_other_threads_run_meanwhile(broker, tmp):
    import signal

    from conftest import python

    p = python(INTERRUPTED, broker.url, tmp / "inbox")
    try:
        assert p.stdout.readline().strip() == "ticked", p.stderr.read()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
        assert out.strip() == "interrupted" and p.returncode == 0, (out, err)
    finally:
        p.kill()


def test_a_group_hands_each_message_over_once_between_its_members(postgres, tmp):
    """Two members of a group with the shared inbox on PostgreSQL, each on
    its own broker of a fanout pair: every message reaches both, and is
    handed over once between them; the group's status counts each once."""
    a, b = Broker().start(), Broker().start()
    try:
        # gap_timeout 1 s: the members say what they removed every 0.5 s.
        common = dict(topics=["g/#"], group="line", shared_inbox=postgres.url, gap_timeout=1.0)
        m1 = dict(client_id="py-g1", brokers=[a.url], inbox=tmp / "g1", **common)
        m2 = dict(client_id="py-g2", brokers=[b.url], inbox=tmp / "g2", **common)
        steadfast.Consumer.register(**m1)
        steadfast.Consumer.register(**m2)
        n = 200
        with steadfast.Client("py-gp", brokers=[a.url, b.url], mode="fanout", ack="all", outbox=tmp / "o") as client:
            client.publish_many([("g/t", f"job-{i}") for i in range(n)])
            assert client.wait_idle(timeout=20), client.status()
        seen = {}
        with steadfast.Consumer(**m1) as c1, steadfast.Consumer(**m2) as c2:
            deadline = time.monotonic() + 60
            while len(seen) < n:
                assert time.monotonic() < deadline, f"{len(seen)} of {n} within 60 s"
                for c in (c1, c2):
                    d = c.next(timeout=0.05)
                    if d is not None:
                        seen[d.payload] = seen.get(d.payload, 0) + 1
                        d.ack()
            # Each broker's copy of every message came to a member: the
            # second copies are removed, not handed over.
            wait_until("both members' copies settled", lambda: c1.handled + c2.handled == n)
            # Every second copy removed, counted by the member that removed it.
            deadline = time.monotonic() + 30
            while steadfast.group_status(postgres.url, group="line")[0]["duplicates"] < n:
                assert time.monotonic() < deadline, steadfast.group_status(postgres.url, group="line")
                time.sleep(0.2)
            assert c1.next(timeout=0.5) is None and c2.next(timeout=0.5) is None
        assert sorted(seen) == sorted(f"job-{i}".encode() for i in range(n))
        assert set(seen.values()) == {1}, {k: v for k, v in seen.items() if v > 1}
        [group] = steadfast.group_status(postgres.url, group="line")
        assert group["group"] == "line" and group["handled"] == n, group
        assert sorted(m["member"] for m in group["members"]) == ["py-g1", "py-g2"]
        assert group["duplicates"] == n, group
    finally:
        a.kill9()
        b.kill9()


def test_group_mistakes_raise_config_error(postgres, tmp):
    args = dict(client_id="py-gx", brokers=["mqtt://127.0.0.1:9"], inbox=tmp / "gx", topics=["g/#"])
    with pytest.raises(steadfast.ConfigError, match="--group NAME"):
        steadfast.Consumer.register(**args, shared_inbox=postgres.url)
    with pytest.raises(steadfast.ConfigError, match="consumer group name"):
        steadfast.Consumer.register(**args, group="a/b", shared_inbox=postgres.url)
    with pytest.raises(steadfast.ConfigError, match="sslmode=allow"):
        steadfast.Consumer.register(**args, group="g", shared_inbox=postgres.url + "?sslmode=allow")
    with pytest.raises(steadfast.SteadfastError, match="no consumer group has used this database"):
        steadfast.group_status(postgres.url)
