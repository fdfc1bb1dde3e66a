"""Receive from two brokers, each message once: a consumer with a
persistent session on both, de-duplicating by the producer's identity in
its inbox on disk, and acknowledging only after handling.

    python3 receive_from_two.py BROKER_A BROKER_B INBOX N

Prints each payload once, then exits 0 once N distinct messages were
handled (1 if they do not come within 60 s).
"""

import sys

import steadfast


def main():
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    a, b, inbox, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    handled = 0
    with steadfast.Consumer("two-demo", brokers=[a, b], inbox=inbox, topics=["demo/#"]) as consumer:
        while handled < n:
            d = consumer.next(timeout=60)
            if d is None:
                print(f"only {handled} of {n} within 60 s", file=sys.stderr)
                return 1
            print(d.payload.decode(), flush=True)
            d.ack()
            handled += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
