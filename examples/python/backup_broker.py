"""Publish with a backup broker, the three classic ways, without losing a
message in any of them.

    python3 backup_broker.py at-start  PRIMARY BACKUP OUTBOX [N]
    python3 backup_broker.py failover  PRIMARY BACKUP OUTBOX [N]
    python3 backup_broker.py both      PRIMARY BACKUP OUTBOX [N]

at-start: the primary is down when the program starts: messages go to the
  backup (a paho script would retry the primary for ever, or connect once).
failover: switch to the backup on failure, queue on disk while both are
  down, fail back to the primary once it has stayed up for a while.
both: publish to both brokers (fanout); a consumer on both removes the
  copies by identity (see receive_from_two.py).

Each publishes N messages (default 100) on `demo/backup`, waits until every
one is acknowledged (at most 60 s), prints which broker took how many, and
exits 0; 1 if something is still queued (it stays on disk for the next run).
"""

import sys

import steadfast


def main():
    if len(sys.argv) < 5 or sys.argv[1] not in ("at-start", "failover", "both"):
        print(__doc__, file=sys.stderr)
        return 2
    way, primary, backup, outbox = sys.argv[1:5]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    mode = "fanout" if way == "both" else "failover"
    with steadfast.Client("backup-demo", brokers=[primary, backup], outbox=outbox, mode=mode) as client:
        client.publish_many([("demo/backup", f"reading {i}") for i in range(n)])
        done = client.wait_idle(timeout=60)
        for b in client.status()["brokers"]:
            print(f"{b['url']}: {b['acked']} acknowledged ({b['state']})")
        if not done:
            print(f"{client.status()['queued']} still queued, kept on disk for the next run", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
