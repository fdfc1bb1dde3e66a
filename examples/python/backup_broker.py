"""Publish with a backup broker, the three classic ways, without losing a
message in any of them.

    python3 backup_broker.py at-start  PRIMARY BACKUP OUTBOX [N [EVERY_MS]]
    python3 backup_broker.py failover  PRIMARY BACKUP OUTBOX [N [EVERY_MS]]
    python3 backup_broker.py both      PRIMARY BACKUP OUTBOX [N [EVERY_MS]]

at-start: the primary is down when the program starts: messages go to the
  backup (a paho script would retry the primary for ever, or connect once).
failover: switch to the backup on failure, queue on disk while both are
  down, fail back to the primary once it has stayed up for 2 seconds
  (a lost broker is retried at least once a second).
both: publish to both brokers (fanout); a consumer on both removes the
  copies by identity (see receive_from_two.py).

Each publishes N messages (default 100) on `demo/backup`, one every
EVERY_MS milliseconds (default 0: all at once), printing a line per 50
accepted and each failover and fail-back as it happens (stop the primary
while it runs). Then it waits until every one is acknowledged (at most
60 s), prints which broker took how many, and exits 0; 1 if something is
still queued (it stays on disk for the next run).
"""

import sys
import time

import steadfast


def on_event(event):
    if event.kind in ("failover", "failback"):
        d = event.detail
        print(f"{event.kind}: {d['from']} -> {d['to'] or 'none (queued on disk)'}", flush=True)


def main():
    if len(sys.argv) < 5 or sys.argv[1] not in ("at-start", "failover", "both"):
        print(__doc__, file=sys.stderr)
        return 2
    way, primary, backup, outbox = sys.argv[1:5]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    every = int(sys.argv[6]) / 1000 if len(sys.argv) > 6 else 0.0
    mode = "fanout" if way == "both" else "failover"
    # backoff: retry a lost broker within a second (the default grows to
    # 30 s), so the fail-back follows the primary's return promptly.
    with steadfast.Client(
        "backup-demo",
        brokers=[primary, backup],
        outbox=outbox,
        mode=mode,
        failback_after=2.0,
        backoff="100ms..1s",
        on_event=on_event,
    ) as client:
        if every == 0:
            client.publish_many([("demo/backup", f"reading {i}") for i in range(n)])
        for i in range(n if every else 0):
            client.publish("demo/backup", f"reading {i}")
            if (i + 1) % 50 == 0:
                print(f"{i + 1} accepted", flush=True)
            time.sleep(every)
        done = client.wait_idle(timeout=60)
        for b in client.status()["brokers"]:
            print(f"{b['url']}: {b['acked']} acknowledged ({b['state']})")
        if not done:
            print(f"{client.status()['queued']} still queued, kept on disk for the next run", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
