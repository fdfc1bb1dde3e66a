"""Publishes N QoS 1 messages `p-000000`.. with paho-mqtt 2 (MQTT 3.1.1, no
steadfast identity), a few hundred at a time, and waits for every PUBACK.

usage: paho_pub.py HOST PORT TOPIC N
"""
import sys
import time

import paho.mqtt.client as mqtt

host, port, topic, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pub", protocol=mqtt.MQTTv311)
c.max_inflight_messages_set(100)
c.max_queued_messages_set(0)
c.connect(host, port)
c.loop_start()
infos = []
for i in range(n):
    infos.append(c.publish(topic, f"p-{i:06}", qos=1))
    if i % 250 == 249:
        time.sleep(0.1)
for info in infos:
    info.wait_for_publish(timeout=60)
    if not info.is_published():
        sys.exit(f"message {info.mid} not acknowledged")
c.disconnect()
c.loop_stop()
