"""Subscribes with paho-mqtt 2 (MQTT 3.1.1, persistent session) and prints
each payload on its own line; `SUBSCRIBED` once the broker granted the
subscription. Exits once N distinct payloads arrived.

usage: paho_sub.py HOST PORT FILTER N
"""
import sys

import paho.mqtt.client as mqtt

host, port, topic, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
seen = set()


def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(topic, qos=1)


def on_subscribe(client, userdata, mid, reasons, properties):
    print("SUBSCRIBED", flush=True)


def on_message(client, userdata, msg):
    p = msg.payload.decode()
    print(p, flush=True)
    seen.add(p)
    if len(seen) >= n:
        client.disconnect()


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-sub", clean_session=False, protocol=mqtt.MQTTv311)
c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
c.connect(host, port)
c.loop_forever()
