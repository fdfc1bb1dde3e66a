"""The three use cases of MicroPython's umqtt.robust, each with the
delivery it needs, from one outbox on disk.

    python3 robust.py BROKER OUTBOX

- telemetry: a reading is worth sending for 5 seconds; a stale one is
  dropped (counted as `expired`), never sent late;
- a button press: must arrive within 30 seconds, ahead of telemetry
  (priority 9), or it is dropped as expired and the user is told;
- an alarm: kept until delivered, whatever the outage (persistent, the
  default), with a battery-friendly reconnect: the `battery` backoff
  waits 30 s to 15 min between attempts, at most 12 an hour, so a device
  does not wake its radio every few seconds while its broker is down.

Publishes one of each, waits (at most 60 s) until each left the outbox,
prints each one's outcome and exits 0.
"""

import sys

import steadfast


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    broker, outbox = sys.argv[1], sys.argv[2]

    def on_event(e):
        if e.kind in ("connect_failed", "disconnected"):
            print(f"{e.broker}: {e.detail['error']}; next attempt in {e.detail['retry_in']:.0f} s", flush=True)

    with steadfast.Client("robust-demo", brokers=[broker], outbox=outbox, backoff="battery", on_event=on_event) as client:
        receipts = {
            "telemetry": client.publish("demo/telemetry", b"21.5", qos=1, ttl=5),
            "button": client.publish("demo/button", b"pressed", qos=1, ttl=30, priority=9),
            "alarm": client.publish("demo/alarm", b"door open", qos=1),
        }
        for what, r in receipts.items():
            r.wait(timeout=60)
            print(f"{what}: {r.outcome}")
        print(f"drops: {client.status()['drops']['expired']} expired")
    return 0


if __name__ == "__main__":
    sys.exit(main())
