"""Python publish rate: steadfast against paho-mqtt 2, same Mosquitto,
same run (issue 20's benchmark). Every steadfast message is synced to
disk before its receipt comes back; paho keeps nothing.

    python3 crates/python/bench/publish.py [--messages 100000]

Prints each client's rate and the ratio steadfast / paho (pipelined).
Starts its own Mosquitto on a free loopback port and stops it (by PID).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import paho.mqtt.client as paho

import steadfast


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(port, dir):
    conf = os.path.join(dir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\n")
    binary = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else shutil.which("mosquitto")
    proc = subprocess.Popen([binary, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if time.monotonic() > deadline:
            raise SystemExit("mosquitto did not start")
        time.sleep(0.02)


def paho_pipelined(port, n, payload, batch):
    """paho-mqtt 2 pipelined: QoS 1, a window of 256, `batch` messages
    published before waiting for their acknowledgements (waiting only for
    the last of 100,000 left some unacknowledged for minutes)."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=paho.MQTTv5)
    c.max_inflight_messages_set(256)
    c.max_queued_messages_set(0)
    acked = threading.Semaphore(0)
    c.on_publish = lambda *a: acked.release()
    c.connect("127.0.0.1", port)
    c.loop_start()
    start = time.perf_counter()
    for i in range(0, n, batch):
        k = min(batch, n - i)
        for _ in range(k):
            c.publish("bench/paho", payload, qos=1)
        for _ in range(k):
            if not acked.acquire(timeout=60):
                raise SystemExit("paho-mqtt: an acknowledgement did not come within 60 s")
    rate = n / (time.perf_counter() - start)
    c.loop_stop()
    c.disconnect()
    return rate


def paho_each(port, n, payload):
    """paho-mqtt 2, `wait_for_publish` on each message."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho-each", protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    start = time.perf_counter()
    for _ in range(n):
        c.publish("bench/paho", payload, qos=1).wait_for_publish()
    rate = n / (time.perf_counter() - start)
    c.loop_stop()
    c.disconnect()
    return rate


def steadfast_many(port, n, payload, outbox, batch):
    """steadfast: `publish_many` in batches (each on disk when it returns), then until all are acknowledged."""
    with steadfast.Client("bench-sf", brokers=[f"mqtt://127.0.0.1:{port}"], outbox=outbox) as c:
        start = time.perf_counter()
        for i in range(0, n, batch):
            c.publish_many([("bench/sf", payload)] * min(batch, n - i))
        assert c.wait_idle(timeout=300), c.status()
        return n / (time.perf_counter() - start)


def steadfast_each(port, n, payload, outbox):
    """steadfast: `publish` one at a time (each synced to disk before it returns)."""
    with steadfast.Client("bench-sf-each", brokers=[f"mqtt://127.0.0.1:{port}"], outbox=outbox) as c:
        start = time.perf_counter()
        for _ in range(n):
            c.publish("bench/sf", payload)
        assert c.wait_idle(timeout=300), c.status()
        return n / (time.perf_counter() - start)


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--messages", type=int, default=100_000)
    a.add_argument("--each", type=int, default=5_000, help="messages for the one-at-a-time forms")
    a.add_argument("--batch", type=int, default=1_000)
    args = a.parse_args()
    payload = b"x" * 64
    work = tempfile.mkdtemp(prefix="steadfast-pybench-")
    port = free_port()
    broker = start_mosquitto(port, work)
    try:
        pp = paho_pipelined(port, args.messages, payload, args.batch)
        sm = steadfast_many(port, args.messages, payload, os.path.join(work, "ob1"), args.batch)
        pe = paho_each(port, args.each, payload)
        se = steadfast_each(port, args.each, payload, os.path.join(work, "ob2"))
    finally:
        os.kill(broker.pid, signal.SIGKILL)
        broker.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"publish: {args.messages} QoS 1 messages of 64 bytes to Mosquitto 127.0.0.1, from Python")
    print(f"  paho-mqtt 2, pipelined (window 256, batches of {args.batch}) {pp:10.0f} msg/s")
    print(f"  steadfast publish_many (batches of {args.batch}), synced {sm:10.0f} msg/s   ratio {sm / pp:.2f}")
    print(f"  paho-mqtt 2, wait_for_publish on each ({args.each})  {pe:10.0f} msg/s")
    print(f"  steadfast publish on each, synced ({args.each})     {se:10.0f} msg/s   ratio {se / pe:.2f}")


if __name__ == "__main__":
    main()
