"""What a Python user relies on, against real Mosquitto."""

import os
import signal

import steadfast
from conftest import Broker, drain, free_port, python, wait_until

PRODUCER = """
import sys, steadfast
url, outbox, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = steadfast.Client("py-gw", brokers=[url], outbox=outbox)
for i in range(n):
    client.publish("py/t", f"m-{i:04}".encode(), qos=1)
print("accepted", n, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_producer_killed_with_the_broker_down_loses_nothing(tmp):
    """1,000 messages published while the broker is down, the process
    kill -9ed: a new process on the same outbox delivers all of them."""
    port = free_port(below_ephemeral=True)
    url = f"mqtt://127.0.0.1:{port}"
    outbox = tmp / "outbox"
    p = python(PRODUCER, url, outbox, 1000)
    line = p.stdout.readline()
    assert line.split() == ["accepted", "1000"], p.stderr.read()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    broker = Broker(port=port).start()
    try:
        Consumer_args = dict(client_id="py-line", brokers=[url], inbox=tmp / "inbox", topics=["py/#"])
        steadfast.Consumer.register(**Consumer_args)
        # The first process never reached a broker: whatever arrives now
        # comes from its outbox (the new process starts sending at once).
        with steadfast.Client("py-gw", brokers=[url], outbox=outbox) as client:
            assert client.wait_idle(timeout=30), client.status()
        with steadfast.Consumer(**Consumer_args) as consumer:
            seen = drain(consumer, 1000)
        assert sorted(seen) == [f"m-{i:04}".encode() for i in range(1000)]
        assert set(seen.values()) == {1}
    finally:
        broker.kill9()


def test_a_message_whose_handler_raises_comes_again(broker, tmp):
    """The handler raises on the first try: nothing was acknowledged, and
    the message is handed over again."""
    args = dict(client_id="py-raise", brokers=[broker.url], inbox=tmp / "inbox", topics=["r/#"])
    steadfast.Consumer.register(**args)
    with steadfast.Client("py-raise-p", brokers=[broker.url], outbox=tmp / "outbox") as client:
        for i in range(3):
            client.publish("r/t", f"job-{i}")
        assert client.wait_idle(timeout=10)
    handled, tries = [], {}

    def handle(d):
        tries[d.payload] = tries.get(d.payload, 0) + 1
        if d.payload == b"job-1" and tries[d.payload] == 1:
            raise RuntimeError("the handler failed")
        handled.append(d.payload)

    with steadfast.Consumer(**args) as consumer:
        while len(handled) < 3:
            d = consumer.next(timeout=10)
            assert d is not None, f"handled {handled}, tries {tries}"
            try:
                handle(d)
                d.ack()
            except RuntimeError:
                del d  # dropped without ack(): it comes again
    assert sorted(handled) == [b"job-0", b"job-1", b"job-2"]
    assert tries[b"job-1"] == 2


def test_failover_to_the_backup_and_identities_reach_the_consumer(tmp):
    """The primary is killed: messages go through the backup; each carries
    the producer's identity, and a consumer on both brokers takes each once."""
    a, b = Broker().start(), Broker().start()
    try:
        urls = [a.url, b.url]
        args = dict(client_id="py-both", brokers=urls, inbox=tmp / "inbox", topics=["f/#"])
        steadfast.Consumer.register(**args)
        seen = {}

        def take(consumer, n, producer):
            while len(seen) < n:
                d = consumer.next(timeout=20)
                assert d is not None, f"{len(seen)} of {n}"
                assert d.identity is not None and d.identity[0] == producer, d.identity
                seen[d.payload] = seen.get(d.payload, 0) + 1
                d.ack()

        with steadfast.Consumer(**args) as consumer:
            with steadfast.Client("py-fo", brokers=urls, outbox=tmp / "outbox", mode="failover") as client:
                first = [client.publish("f/t", f"a-{i}") for i in range(50)]
                assert all(r.wait(timeout=10) for r in first)
                take(consumer, 50, client.producer_id)
                assert client.status()["brokers"][0]["acked"] == 50
                a.kill9()
                for i in range(50):
                    client.publish("f/t", f"b-{i}")
                assert client.wait_idle(timeout=30), client.status()
                assert client.status()["brokers"][1]["acked"] == 50
                take(consumer, 100, client.producer_id)
        assert set(seen.values()) == {1}
    finally:
        a.kill9()
        b.kill9()


def test_bad_settings_raise_config_error_naming_the_fix(tmp):
    for kwargs, words in [
        (dict(brokers=[]), "brokers is empty"),
        (dict(brokers=["http://x:1"]), "unknown scheme"),
        (dict(brokers=["mqtt://127.0.0.1:1"], mode="mirror"), "use failover, fanout or balance"),
        (dict(brokers=["mqtt://127.0.0.1:1"], qos=3), "use 0, 1 or 2"),
    ]:
        try:
            steadfast.Client("bad", outbox=tmp / "o", **kwargs)
        except steadfast.ConfigError as e:
            assert words in str(e), e
        else:
            raise AssertionError(f"{kwargs} was accepted")
    with steadfast.Client("ok", brokers=["mqtt://127.0.0.1:1"], outbox=tmp / "o2") as c:
        try:
            c.publish("a/#", b"x")
        except steadfast.PublishError as e:
            assert "#" in str(e)
        else:
            raise AssertionError("a wildcard topic was accepted")


CONSUMER = """
import os, sys, steadfast
url, inbox, log, slow = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode()
with open(log, "ab", buffering=0) as out, steadfast.Consumer("py-worker", brokers=[url], inbox=inbox, topics=["k/#"]) as c:
    for d in c:
        if d.payload == slow:
            print("handling", d.payload.decode(), flush=True)
            sys.stdin.read()  # killed in the middle of handling it
        out.write(d.payload + b"\\n")
        os.fsync(out.fileno())
        d.ack()
"""


def test_a_consumer_killed_while_handling_hands_the_message_over_again(broker, tmp):
    """kill -9 in the middle of handling a message: it was not acknowledged,
    so the restarted consumer handles it; what was handled and recorded
    before does not come again."""
    inbox, log = tmp / "inbox", tmp / "handled"
    args = dict(client_id="py-worker", brokers=[broker.url], inbox=inbox, topics=["k/#"])
    steadfast.Consumer.register(**args)
    with steadfast.Client("py-k", brokers=[broker.url], outbox=tmp / "outbox") as client:
        for i in range(200):
            client.publish("k/t", f"k-{i:03}")
        assert client.wait_idle(timeout=20)
    worker = python(CONSUMER, broker.url, inbox, log, "k-120")
    assert worker.stdout.readline().split() == ["handling", "k-120"], worker.stderr.read()
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    handled_before = log.read_bytes().split()
    assert handled_before[:120] == [f"k-{i:03}".encode() for i in range(120)]
    # The rest, after the restart: k-120 first, then on.
    worker = python(CONSUMER, broker.url, inbox, log, "none")
    wait_until("every message handled", lambda: len(set(log.read_bytes().split())) == 200)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    lines = log.read_bytes().split()
    assert set(lines) == {f"k-{i:03}".encode() for i in range(200)}
    again = len(lines) - 200
    # What the first process handled and had not yet recorded when it was
    # killed comes again (the consumer's window: at most the 120 before).
    assert b"k-120" in lines[120:] and lines.count(b"k-120") == 1
    assert again <= 120, again


def test_fanout_to_two_brokers_and_a_consumer_on_both_takes_each_message_once(tmp):
    a, b = Broker().start(), Broker().start()
    try:
        urls = [a.url, b.url]
        args = dict(client_id="py-fan", brokers=urls, inbox=tmp / "inbox", topics=["fan/#"])
        steadfast.Consumer.register(**args)
        with steadfast.Client("py-fan-p", brokers=urls, outbox=tmp / "outbox", mode="fanout") as client:
            for i in range(300):
                client.publish("fan/t", f"x-{i}")
            assert client.wait_idle(timeout=20)
            assert [br["acked"] for br in client.status()["brokers"]] == [300, 300]
        with steadfast.Consumer(**args) as consumer:
            seen = drain(consumer, 300)
            # The copies through the other broker are removed by the inbox.
            assert consumer.next(timeout=1.0) is None
        assert set(seen.values()) == {1}
    finally:
        a.kill9()
        b.kill9()


def test_asyncio_producer_and_consumer(broker, tmp):
    import asyncio

    import steadfast.aio

    args = dict(client_id="py-aio", brokers=[broker.url], inbox=tmp / "inbox", topics=["aio/#"])

    async def main():
        await steadfast.aio.Consumer.register(**args)
        async with steadfast.aio.Client("py-aio-p", brokers=[broker.url], outbox=tmp / "outbox") as client:
            receipts = [await client.publish("aio/t", f"a-{i}") for i in range(100)]
            assert all([await r.wait(timeout=10) for r in receipts])
            assert await client.wait_idle(timeout=10)
        got = []
        async with steadfast.aio.Consumer(**args) as consumer:
            async for d in consumer:
                got.append(d.payload)
                d.ack()
                if len(got) == 100:
                    break
            assert await consumer.next(timeout=0.5) is None
        return got

    got = asyncio.run(main())
    assert sorted(got) == sorted(f"a-{i}".encode() for i in range(100))


def test_publish_many_returns_once_all_are_on_disk(broker, tmp):
    args = dict(client_id="py-many", brokers=[broker.url], inbox=tmp / "inbox", topics=["many/#"])
    steadfast.Consumer.register(**args)
    with steadfast.Client("py-many-p", brokers=[broker.url], outbox=tmp / "outbox") as client:
        receipts = client.publish_many([("many/t", f"m-{i}") for i in range(500)])
        assert [r.id for r in receipts] == list(range(1, 501))
        assert all(r.wait(timeout=10) for r in receipts)
        try:
            client.publish_many([("many/t", b"ok"), ("many/#", b"bad")])
        except steadfast.PublishError as e:
            assert "#" in str(e)
        else:
            raise AssertionError("a wildcard topic was accepted")
        assert client.wait_idle(timeout=10)
    with steadfast.Consumer(**args) as consumer:
        seen = drain(consumer, 501)
    assert b"ok" in seen and len(seen) == 501


EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "examples", "python")


def example(name, *args, timeout=90):
    import subprocess
    import sys

    from conftest import PACKAGE

    env = dict(os.environ, PYTHONPATH=PACKAGE)
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_backup_broker_recipes_deliver_everything(tmp):
    a, b = Broker(), Broker().start()
    try:
        # The primary is down at start: everything goes to the backup.
        out = example("backup_broker.py", "at-start", a.url, b.url, tmp / "o1", 50)
        assert f"{b.url}: 50 acknowledged" in out, out
        # Both up, fanout; a consumer on both prints each message once.
        a.start()
        steadfast.Consumer.register("two-demo", brokers=[a.url, b.url], inbox=tmp / "in", topics=["demo/#"])
        out = example("backup_broker.py", "both", a.url, b.url, tmp / "o2", 50)
        assert f"{a.url}: 50 acknowledged" in out and f"{b.url}: 50 acknowledged" in out, out
        printed = example("receive_from_two.py", a.url, b.url, tmp / "in", 50).splitlines()
        assert sorted(printed) == sorted(f"reading {i}" for i in range(50)), printed
    finally:
        a.kill9()
        b.kill9()


def test_the_failover_recipe_switches_queues_and_fails_back(tmp):
    """backup_broker.py failover while the primary stops and comes back:
    the backup takes over, traffic returns to the primary, and a consumer
    on both prints every reading once."""
    import subprocess
    import sys

    from conftest import PACKAGE

    # The primary comes back after 150 messages; the fail-back needs a
    # reconnect (backoff at most 1 s) and 2 s up, while the remaining 850
    # take at least 8.5 s to publish: a margin of 3x, even on a busy machine
    # (which slows the publishing loop as well).
    N = 1000
    a, b = Broker(persistence=True).start(), Broker().start()
    try:
        steadfast.Consumer.register("two-demo", brokers=[a.url, b.url], inbox=tmp / "in", topics=["demo/#"])
        p = subprocess.Popen(
            [sys.executable, os.path.join(EXAMPLES, "backup_broker.py"), "failover", a.url, b.url, str(tmp / "o"), str(N), "10"],
            env=dict(os.environ, PYTHONPATH=PACKAGE), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines = []

        def read_until(prefix):
            for line in p.stdout:
                lines.append(line.strip())
                if line.startswith(prefix):
                    return line
            raise AssertionError(f"no `{prefix}` line: {lines} {p.stderr.read()}")

        read_until("50 accepted")
        a.stop()  # clean: the consumer's session and its queue stay
        assert read_until("failover:").split() == ["failover:", a.url, "->", b.url]
        read_until("150 accepted")
        a.start()
        assert read_until("failback:").split() == ["failback:", b.url, "->", a.url]
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        # "URL: N acknowledged (state)"
        acked = {line.split(": ")[0]: int(line.split(": ")[1].split()[0]) for line in out.splitlines() if "acknowledged" in line}
        assert acked[a.url] > 0 and acked[b.url] > 0 and acked[a.url] + acked[b.url] == N, out
        printed = example("receive_from_two.py", a.url, b.url, tmp / "in", N).splitlines()
        assert sorted(printed) == sorted(f"reading {i}" for i in range(N)), printed
    finally:
        a.kill9()
        b.kill9()


def test_the_robust_recipe_drops_only_what_is_stale(broker, tmp):
    out = example("robust.py", broker.url, tmp / "o")
    assert "telemetry: delivered" in out and "button: delivered" in out and "alarm: delivered" in out, out
